"""Trackers on the tiny model: wandb offline (one run per stage, grouped) and TensorBoard."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from posttrain.config import LoggerConfig
from posttrain.tracking import group_name, wandb_mode
from tests.conftest import FAST, posttrain_argv


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` transaction log (leveldb-style 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start a record
        if kind in (1, 4):  # full/last end it
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _run(
    tmp_path: Path, *args: str, unset: tuple[str, ...] = (), **env: str
) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path / "run"
    argv, base_env = posttrain_argv(f"run.output_dir={out}", *FAST, *args, cache_dir=tmp_path / "cache")
    env = {k: v for k, v in {**base_env, **env}.items() if k not in unset}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_wandb_offline_writes_one_run_per_stage_with_group_and_job_type(tmp_path):
    # no key, no WANDB_MODE: posttrain picks offline and says so once
    out, proc = _run(tmp_path, "logger=wandb", unset=("WANDB_MODE", "WANDB_API_KEY"), NETRC=str(tmp_path / "none"))
    assert proc.stdout.count("wandb: no API key found, logging offline") == 1
    logs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2
    runs = []
    for log in logs:
        records = list(wandb_records(log))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        summary = {_key(u) for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
        history = {_key(i) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
        config = {u.key for u in run.config.update}
        runs.append((run.run_group, run.job_type, run.project))
        assert {"final/exact_match", "final/train_loss"} <= summary
        assert "train/loss" in history and {"key", "content", "parent"} <= config
    assert runs == [("run", "sft", "posttrain"), ("run", "align", "posttrain")]


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_tensorboard_writes_event_files_per_stage(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = _run(tmp_path, "logger=tensorboard")
    for stage in ("sft", "align"):
        events = EventAccumulator(str(out / stage / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/learning_rate", "final/exact_match"} <= tags, (stage, tags)
        assert len(events.Scalars("train/loss")) >= 3


def test_sweep_runs_share_the_sweep_folder_as_group(tmp_path):
    assert group_name(tmp_path / "sweep" / "3") == "sweep"
    assert group_name(tmp_path / "2026-11-25_10-00-00") == "2026-11-25_10-00-00"


@pytest.mark.parametrize(
    ("env", "mode"),
    [({}, "offline"), ({"WANDB_API_KEY": "k" * 40}, "online"), ({"WANDB_MODE": "disabled"}, "disabled")],
)
def test_wandb_mode_follows_the_key_and_the_environment(monkeypatch, tmp_path, env, mode):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_mode(LoggerConfig(backend="wandb")) == mode
    assert wandb_mode(LoggerConfig(backend="wandb", mode="online")) == "online"
