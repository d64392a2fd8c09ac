"""One stage's bookkeeping (posttrain/stage_run.py) without training a model: the reward trend of
an online stage, the reference a stage compares with, which weights train and the dtype they are
saved in, the whole-run loss of a resumed stage, the manifest, a fresh or resumed stage folder,
where reference log-probs are cached, a failed save, and the manifest status `run_stage` leaves
(complete, failed, interrupted) with the trainer replaced by a stub."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from posttrain import artifacts, stage_model, stage_run
from posttrain.artifacts import Artifact, ArtifactError
from posttrain.data.load import StageData
from posttrain.plan import load_config
from posttrain.preemption import Preempted, PreemptionGuard
from posttrain.stage_cache import StageIndex, eval_key
from posttrain.stage_run import StageRun, reward_trend, whole_run_train_loss
from tests.conftest import compose_tree

PROVENANCE = {"host": "test-host", "pid": 1, "hosts": 1, "world_size": 1, "recipe_commit": None, "versions": {}}


@pytest.fixture(autouse=True)
def no_git(monkeypatch):
    """Manifests record provenance; its git lookup is a subprocess the tests do not need."""
    monkeypatch.setattr(artifacts, "provenance", lambda: dict(PROVENANCE))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def config(tmp_path: Path, *overrides: str):
    return load_config(
        compose_tree([f"run.output_dir={tmp_path / 'out'}", f"run.cache_dir={tmp_path / 'cache'}", *overrides])
    )


def stage_data(train_rows: int = 3, eval_rows: int | None = 2) -> StageData:
    turns = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(9)]
    rows = [{"messages": messages} for messages in turns]
    return StageData(
        train=rows[:train_rows],
        eval=None if eval_rows is None else rows[:eval_rows],
        origin="builtin:sft",
        report={"dropped": 1},
    )


def make_run(cfg, name: str = "sft", **fields) -> StageRun:
    values = dict(
        name=name,
        stage=cfg.stages[name],
        key=f"key-{name}",
        parent=Artifact("base", "/models/base", "key-base"),
        data=stage_data(),
        folder=cfg.run.output_path / name,
        data_fingerprint="fp-123",
    )
    return StageRun(**(values | fields))


# --- pure helpers ----------------------------------------------------------------------------


def test_reward_trend_is_the_first_and_last_logged_reward():
    history = [
        {"step": 1, "loss": 0.9},
        {"step": 2, "reward": 0.1, "loss": 0.8},
        {"step": 3, "loss": 0.7},
        {"step": 4, "reward": 0.4},
        {"step": 6, "reward": 0.7},
        {"step": 6, "train_runtime": 3.0},
    ]
    assert reward_trend(history) == {"train_reward_first": 0.1, "train_reward": 0.7}


def test_reward_trend_of_one_interval_and_of_none():
    assert reward_trend([{"step": 1, "reward": 0.5}]) == {"train_reward_first": 0.5, "train_reward": 0.5}
    assert reward_trend([{"step": 1, "loss": 0.5}]) == {}
    assert reward_trend([]) == {}


def test_the_reference_is_the_parent_unless_pinned(tmp_path):
    cfg = config(tmp_path)
    run = make_run(cfg, "align")
    assert run.reference_artifact is run.parent
    pinned = Artifact("sft", "/runs/sft", "key-sft")
    assert make_run(cfg, "align", reference=pinned).reference_artifact is pinned


def test_only_plain_full_fine_tuning_trains_the_loaded_weights(tmp_path):
    cfg = config(tmp_path)
    assert stage_model.trains_loaded_weights(cfg.stages["sft"], cfg)
    assert not stage_model.trains_loaded_weights(dataclasses.replace(cfg.stages["sft"], peft="lora"), cfg)
    assert not stage_model.trains_loaded_weights(cfg.stages["sft"], config(tmp_path, "peft=lora"))
    assert not stage_model.trains_loaded_weights(cfg.stages["sft"], config(tmp_path, "deepspeed=zero2"))
    # a stage's own `peft: none` overrides the group's lora
    lora = config(tmp_path, "peft=lora")
    assert stage_model.trains_loaded_weights(dataclasses.replace(lora.stages["sft"], peft="none"), lora)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.dtype=float16"], "float16"),  # trained in fp32, computed and saved in fp16
        (["model.dtype=float32"], None),
        (["model.dtype=bfloat16"], None),  # trained in bf16 already
        (["model.dtype=float16", "peft=lora"], None),  # the adapter is merged into weights loaded in fp16
        (["model.dtype=float16", "deepspeed=zero2"], None),
    ],
)
def test_saved_dtype(tmp_path, overrides, expected):
    import torch

    cfg = config(tmp_path, *overrides)
    assert stage_model.saved_dtype(cfg.stages["sft"], cfg) == (getattr(torch, expected) if expected else None)


def test_auto_dtype_saves_bf16_on_a_bf16_gpu_and_as_trained_on_a_cpu(tmp_path, monkeypatch):
    import torch

    cfg = config(tmp_path)  # model.dtype=auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stage_model.saved_dtype(cfg.stages["sft"], cfg) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert stage_model.saved_dtype(cfg.stages["sft"], cfg) == torch.bfloat16


def result(global_step: int, training_loss: float):
    return SimpleNamespace(global_step=global_step, training_loss=training_loss)


def test_whole_run_loss_weights_the_logged_intervals_before_the_checkpoint():
    # logged every 2 steps; resumed from step 4 and ran to step 8 with mean loss 0.5 after it
    history = [
        {"step": 2, "loss": 2.0},
        {"step": 4, "loss": 1.0},
        {"step": 4, "eval_loss": 9.0},
        {"step": 6, "loss": 0.6},  # after the checkpoint: part of training_loss already
    ]
    loss = whole_run_train_loss(history, Path("checkpoint-4"), result(8, 0.5))
    assert loss == pytest.approx((2.0 * 2 + 1.0 * 2 + 0.5 * 4) / 8)


def test_whole_run_loss_extrapolates_steps_logged_after_the_checkpoint_interval():
    # checkpoint at step 5, last log before it at step 4: step 5 gets the mean of steps 1-4
    history = [{"step": 2, "loss": 2.0}, {"step": 4, "loss": 1.0}]
    loss = whole_run_train_loss(history, Path("checkpoint-5"), result(10, 0.4))
    before = 2.0 * 2 + 1.0 * 2
    assert loss == pytest.approx((before + before / 4 * 1 + 0.4 * 5) / 10)


def test_whole_run_loss_without_a_log_before_the_checkpoint_is_the_resumed_steps_mean():
    # logging_steps 10, preempted at step 7: no loss was logged before the checkpoint
    assert whole_run_train_loss([], Path("checkpoint-7"), result(20, 1.0)) == pytest.approx(1.0)


def test_whole_run_loss_of_an_uninterrupted_interval_equals_the_plain_mean():
    history = [{"step": 3, "loss": 0.7}]
    assert whole_run_train_loss(history, Path("checkpoint-3"), result(6, 0.7)) == pytest.approx(0.7)


def test_stage_manifest_records_lineage_data_launch_and_extra_fields(tmp_path):
    cfg = config(tmp_path)
    run = make_run(cfg, data=stage_data(train_rows=3, eval_rows=None))
    manifest = stage_run.stage_manifest(run, cfg, "running", attempts=[{"started": 1.0}])
    assert manifest["status"] == "running"
    assert (manifest["stage"], manifest["method"], manifest["key"]) == ("sft", "sft", "key-sft")
    assert manifest["parent"] == {"name": "base", "key": "key-base", "source": "/models/base"}
    assert manifest["data"] == {
        "origin": "builtin:sft",
        "fingerprint": "fp-123",
        "train_rows": 3,
        "eval_rows": 0,
        "curation": {"dropped": 1},
    }
    assert manifest["config"]["learning_rate"] == cfg.stages["sft"].learning_rate
    assert manifest["launch"]["launcher"] == "local" and manifest["launch"]["deepspeed"]["stage"] is None
    assert manifest["attempts"] == [{"started": 1.0}] and manifest["host"] == "test-host"
    json.dumps(manifest)  # written as JSON


# --- the stage folder ------------------------------------------------------------------------


def test_a_fresh_attempt_starts_from_an_empty_folder(tmp_path):
    cfg = config(tmp_path)
    run = make_run(cfg)
    (run.folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run.folder / "metrics.jsonl").write_text('{"step": 1}\n')
    stage_run.prepare_folder(run, cfg)
    assert run.folder.is_dir() and list(run.folder.iterdir()) == []


def test_a_fresh_attempt_replaces_a_link_without_touching_its_target(tmp_path):
    cfg = config(tmp_path)
    run = make_run(cfg)
    elsewhere = tmp_path / "cache" / "sft-old"
    elsewhere.mkdir(parents=True)
    (elsewhere / "model.safetensors").write_text("weights")
    cfg.run.output_path.mkdir(parents=True)
    run.folder.symlink_to(elsewhere, target_is_directory=True)
    stage_run.prepare_folder(run, cfg)
    assert not run.folder.is_symlink() and run.folder.is_dir() and list(run.folder.iterdir()) == []
    assert (elsewhere / "model.safetensors").read_text() == "weights"


def test_a_resumed_attempt_keeps_its_checkpoint_and_the_log_up_to_it(tmp_path):
    cfg = config(tmp_path)
    folder = tmp_path / "cache" / "stages" / "sft-abc"  # trained by an earlier run on this cache
    checkpoints = folder / "checkpoints"
    for step in (2, 4, 6):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
    records = [
        {"step": 2, "loss": 1.0},
        {"step": 4, "loss": 0.8},
        {"step": 4, "eval_loss": 0.9},  # the evaluation at the checkpoint step is logged again
        {"step": 5, "loss": 0.7},
    ]
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # cut short by the crash
    run = make_run(cfg, folder=folder, checkpoint=checkpoints / "checkpoint-4")
    cfg.run.output_path.mkdir(parents=True)  # made by run_pipeline's check_writable
    stage_run.prepare_folder(run, cfg)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]
    kept = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:2]
    own = cfg.run.output_path / "sft"
    assert own.is_symlink() and own.resolve() == folder.resolve()


# --- reference log-probs and saving ----------------------------------------------------------


def test_reference_log_probs_of_the_base_model_live_in_the_cache(tmp_path):
    cfg = config(tmp_path, "model.dtype=float32")
    cache = stage_run.ref_logps_cache(make_run(cfg, "align"), cfg)
    assert cache.folder == tmp_path / "cache" / "ref_logps" / "key-base"
    assert cache.reference_key == "key-base"
    assert cache.model_settings == "torch.float32>torch.float32|sdpa|full"


def test_reference_log_probs_of_a_stage_live_beside_it(tmp_path):
    cfg = config(tmp_path, "model.dtype=bfloat16")
    sft = Artifact("sft", str(tmp_path / "out" / "sft"), "key-sft")
    stage = dataclasses.replace(cfg.stages["align"], peft="qlora")
    cache = stage_run.ref_logps_cache(make_run(cfg, "align", stage=stage, parent=sft), cfg)
    assert cache.folder == tmp_path / "out" / "sft" / "ref_logps"
    assert cache.reference_key == "key-sft"
    assert cache.model_settings == "torch.bfloat16>torch.bfloat16|sdpa|nf4"


def test_a_pinned_reference_names_the_cache(tmp_path):
    cfg = config(tmp_path)
    sft = Artifact("sft", str(tmp_path / "out" / "sft"), "key-sft")
    parent = Artifact("align", str(tmp_path / "out" / "align"), "key-align")
    cache = stage_run.ref_logps_cache(make_run(cfg, "align", parent=parent, reference=sft), cfg)
    assert cache.folder == tmp_path / "out" / "sft" / "ref_logps" and cache.reference_key == "key-sft"


class FullDisk:
    name_or_path = "/models/base"

    def save_pretrained(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_is_one_artifact_error(tmp_path):
    cfg = config(tmp_path)
    run = make_run(cfg)
    with pytest.raises(ArtifactError) as raised:
        stage_model.save_model(run, FullDisk(), tokenizer=None)
    message = str(raised.value)
    assert "saving stage sft" in message and str(run.folder) in message
    assert "No space left on device" in message and "not marked complete" in message


# --- run_stage's manifest, with the training replaced ----------------------------------------


def stub_training(monkeypatch, outcome):
    """Replace train_stage by `outcome(run)`: (model, metrics) or an exception."""
    calls = []

    def train_stage(run, cfg, tokenizer, guard, callbacks):
        calls.append(json.loads((run.folder / artifacts.MANIFEST).read_text())["status"])
        return outcome(run)

    monkeypatch.setattr(stage_run, "train_stage", train_stage)
    return calls


def test_a_stage_is_running_while_it_trains_and_complete_after(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    run = make_run(cfg)
    index = StageIndex(cfg.run.cache_path)

    def trained(run):
        (run.folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (run.folder / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
        return None, {"train_loss": 0.25, "train_steps": 2}

    seen = stub_training(monkeypatch, trained)
    metrics, replies, timings = stage_run.run_stage(run, cfg, None, None, PreemptionGuard(), index)
    assert seen == ["running"]
    assert metrics == {"train_loss": 0.25, "train_steps": 2} and replies == []
    assert {"train:sft", "eval:sft", "save:sft"} <= set(timings)
    manifest = artifacts.read_manifest(run.folder)
    assert manifest["status"] == "complete" and manifest["metrics"] == metrics
    assert manifest["eval_key"] == eval_key(run.stage, cfg, None)
    assert manifest["files"] == {"metrics.jsonl": len('{"step": 2, "loss": 1.0}\n')}
    assert len(manifest["attempts"]) == 1 and manifest["attempts"][0]["finished"] >= manifest["attempts"][0]["started"]
    assert not (run.folder / "checkpoints").exists()  # the final model supersedes them
    assert index.lookup("key-sft") == run.folder.resolve()


def test_an_error_marks_the_stage_failed_and_is_raised(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    run = make_run(cfg)

    def broken(run):
        raise RuntimeError("CUDA out of memory")

    stub_training(monkeypatch, broken)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        stage_run.run_stage(run, cfg, None, None, PreemptionGuard(), StageIndex(cfg.run.cache_path))
    manifest = artifacts.read_manifest(run.folder)
    assert manifest["status"] == "failed" and manifest["error"] == "RuntimeError: CUDA out of memory"
    assert "metrics" not in manifest


def test_a_stop_signal_marks_the_stage_interrupted_at_its_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    run = make_run(cfg)
    guard = PreemptionGuard()
    guard.signal_name = "SIGTERM"

    def stopped(run):
        states = ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"glob'))  # checkpoint-6 cut short
        for step, state in states:
            (run.folder / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
            (run.folder / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
        return None, {"stopped": True}

    stub_training(monkeypatch, stopped)
    with pytest.raises(Preempted, match="SIGTERM: stage sft saved .*checkpoint-4"):
        stage_run.run_stage(run, cfg, None, None, guard, StageIndex(cfg.run.cache_path))
    manifest = artifacts.read_manifest(run.folder)
    assert manifest["status"] == "interrupted"
    assert Path(manifest["checkpoint"]) == run.folder / "checkpoints" / "checkpoint-4"


def test_a_resumed_stage_adds_an_attempt_to_its_manifest(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    run = make_run(cfg)
    checkpoint = run.folder / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    earlier = {"status": "interrupted", "attempts": [{"started": 100.0, "resumed_from": None}]}
    artifacts.write_json_atomic(run.folder / artifacts.MANIFEST, earlier)
    run.checkpoint = checkpoint
    stub_training(monkeypatch, lambda run: (None, {"train_steps": 8}))
    stage_run.run_stage(run, cfg, None, None, PreemptionGuard(), StageIndex(cfg.run.cache_path))
    attempts = artifacts.read_manifest(run.folder)["attempts"]
    assert [a["started"] for a in attempts][0] == 100.0 and len(attempts) == 2
    assert attempts[1]["resumed_from"] == str(checkpoint) and "finished" in attempts[1]
    assert "finished" not in attempts[0]
