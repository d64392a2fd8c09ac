"""The schema's batch arithmetic: global_batch_size gives the accumulation for the planned world."""

from __future__ import annotations

from pathlib import Path

from posttrain.cli import compose_tree
from posttrain.plan import load_config
from tests.conftest import REPO

HOSTFILE = REPO / "launch" / "hostfile.example"


def config(*overrides: str, tmp_path: Path | None = None):
    run = [f"run.output_dir={tmp_path / 'run'}"] if tmp_path else []
    return load_config(compose_tree([*run, *overrides]))


def test_global_batch_size_sets_the_accumulation_for_the_planned_world():
    cfg = config(
        "launcher=torchrun", "launcher.gpus=8", "launcher.nnodes=4", "launcher.master_addr=node-0",
        "sft.per_device_train_batch_size=4", "sft.global_batch_size=256",
    )  # fmt: skip
    assert cfg.stages["sft"].gradient_accumulation_steps == 256 // (4 * 32)


def test_a_global_batch_is_keyed_by_the_accumulation_it_gives():
    from posttrain.stage_cache import stage_keys

    via_global = stage_keys(config("sft.per_device_train_batch_size=32", "sft.global_batch_size=64"))
    via_accumulation = stage_keys(config("sft.per_device_train_batch_size=32", "sft.gradient_accumulation_steps=2"))
    assert via_global == via_accumulation != stage_keys(config("sft.per_device_train_batch_size=32"))
