"""LoRA SFT -> DPO under DeepSpeed ZeRO-3 with 2 CPU workers, for both hand-offs: the base is
partitioned as it loads and only the adapters train; every merged model (gathered one parameter
at a time on rank 0) is its base plus scale x B @ A of its adapters; the stacked reference is the
SFT model; and a run killed with SIGKILL (every process of it, as a lost node) and run again ends
where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.artifacts import read_json
from posttrain.plan import load_config
from tests.conftest import FAST, compose_tree, posttrain_argv, run_posttrain
from tests.integration.test_lora_handoff import LORA, POLICIES, assert_merged_models, assert_stacked_reference
from tests.integration.test_resume import CHECKPOINTS, TOLERANCE, _max_difference, _wait_for

pytestmark = pytest.mark.distributed

# two workers of micro-batch 8 under ZeRO-3: the global batch of FAST's single process (16)
ZERO3 = [
    "deepspeed=zero3",
    "launcher=deepspeed",
    "launcher.gpus=2",
    "sft.per_device_train_batch_size=8",
    "align.per_device_train_batch_size=8",
]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return [p for child in found for p in (child, *descendants(child))]


def overrides(handoff: str, out: Path) -> list[str]:
    return [*FAST, *CHECKPOINTS, *ZERO3, *LORA, *POLICIES[handoff], "peft.save_adapter=true", f"run.output_dir={out}"]


@pytest.fixture(scope="module", params=["merge", "stack"])
def zero3_run(request, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"zero3-{request.param}") / "run"
    args = overrides(request.param, out)
    proc = run_posttrain(*args, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    cfg = load_config(compose_tree([*args, f"run.cache_dir={cache_dir}"]), on_launch_node=False)
    return request.param, out, cfg


def test_the_base_is_partitioned_and_only_the_adapters_train(zero3_run):
    handoff, out, cfg = zero3_run
    for stage in ("sft", "align"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["launch"]["deepspeed"]["stage"] == 3
        written = json.loads((out / "launch" / f"deepspeed-{stage}.json").read_text())
        assert written["zero_optimization"]["stage"] == 3
        adapter = load_file(str(out / stage / "adapter" / "adapter_model.safetensors"))
        assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
        assert all(t.numel() > 0 for t in adapter.values()), "gathered, not a rank's empty partition"


def test_each_merged_model_is_its_base_plus_its_adapters(zero3_run, cache_dir):
    _, out, cfg = zero3_run
    assert_merged_models(out, cfg, cache_dir)


def test_stacked_reference_is_the_sft_model(zero3_run):
    handoff, out, cfg = zero3_run
    if handoff != "stack":
        pytest.skip("merge: the reference is the merged SFT folder itself")
    assert_stacked_reference(out, cfg)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(zero3_run, tmp_path):
    """SIGKILL to every process of the run after DPO's first checkpoint (no handler runs, no
    checkpoint is written on the way out); the same command resumes and ends as one run would."""
    handoff, reference, _ = zero3_run
    out, cache_dir = tmp_path / "run", tmp_path / "cache"  # its own cache: nothing to reuse
    argv, env = posttrain_argv(*overrides(handoff, out), cache_dir=cache_dir)
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # written in full: a kill while trainer_state.json is half-written leaves a checkpoint the
    # re-run rightly ignores (it starts the stage again), which this test is not about
    checkpoint = out / "align" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    _wait_for(lambda: read_json(checkpoint) is not None, proc)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher runs in its own session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    rerun = run_posttrain(*overrides(handoff, out), cache_dir=cache_dir)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-6000:]
    assert "stage align (dpo) resuming" in rerun.stdout
    for stage in ("sft", "align"):
        assert _max_difference(out / stage, reference / stage) <= TOLERANCE
    resumed = load_file(str(out / "align" / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(reference / "align" / "adapter" / "adapter_model.safetensors"))
    assert max((resumed[k] - expected[k]).abs().max().item() for k in expected) <= TOLERANCE
