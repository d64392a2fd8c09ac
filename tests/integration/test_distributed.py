"""Real multi-process runs on this CPU (gloo): SFT -> DPO with 2 workers under DDP (torchrun),
DeepSpeed ZeRO-2 and ZeRO-3 (deepspeed launcher) and ZeRO-2 with optimizer offload (torchrun),
each compared with one process training on the same global batch.

Every run writes per-rank logs (`run.rank_logs=true`): a digest of each row a rank trained on
at each step, and the losses it logged. Two workers of micro-batch 8 must split exactly the 16
rows the single process trained on at the same step, agree on every logged loss, and follow
the single process's loss curve.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.artifacts import read_json
from posttrain.preemption import EXIT_PREEMPTED
from tests.conftest import posttrain_argv, run_posttrain

pytestmark = pytest.mark.distributed

STAGES = ("sft", "align")
COMMON = [
    "data.builtin.num_sft=320",
    "data.builtin.num_preference=160",
    "data.builtin.num_test=32",
    "sft.max_steps=8",
    "sft.learning_rate=2e-3",
    "sft.logging_steps=1",
    "sft.eval.num_prompts=16",
    "sft.eval.num_loss_rows=16",
    "align.max_steps=4",
    "align.learning_rate=3e-4",
    "align.logging_steps=1",
    "align.eval.num_prompts=16",
    "align.eval.num_loss_rows=16",
    "run.rank_logs=true",
    "run.reuse=false",
]
SHM, SHM_BUFFERS = Path("/dev/shm"), "deepspeed_allreduce_buffer_*"
# one process, batch 16 / two processes, batch 8 each: the same 16 rows per optimizer step
# DPO alone: TRL's NLL term (RPO, the tuned default) is a token mean per rank, so two ranks weigh
# their halves' tokens differently; how much depends on the rows (2.2e-4 on the first 64 pairs,
# 4.7e-3 on the seeded sample max_steps keeps), which would hide a real difference
DPO_ALONE = ["align.loss_type=[sigmoid]", "align.loss_weights=[1.0]"]
SINGLE = ["sft.per_device_train_batch_size=16", "align.per_device_train_batch_size=16", *DPO_ALONE]
TWO = ["launcher.gpus=2", "sft.per_device_train_batch_size=8", "align.per_device_train_batch_size=8"]
VARIANTS = {
    "ddp_torchrun": ["launcher=torchrun"],
    "zero2_deepspeed": ["deepspeed=zero2", "launcher=deepspeed"],
    "zero3_deepspeed": ["deepspeed=zero3", "launcher=deepspeed"],
    "zero2_offload_torchrun": ["deepspeed=zero2_offload", "launcher=torchrun"],
    "zero2_accelerate": ["deepspeed=zero2", "launcher=accelerate"],
}
# logged losses of the two-process runs vs the single process (measured: SFT 1.6e-7 under DDP,
# ZeRO-2 and ZeRO-3, 5.1e-7 with offload). SFT differs in float32 rounding only (its loss is a
# token mean over all ranks); so does DPO without its NLL term (DPO_ALONE), within the bound that
# held it with the term
LOSS_RTOL = {"sft": 1e-5, "align": 2e-3}
# final next-token probabilities vs the single process's (measured 6.4e-5)
PROBS_ATOL = 5e-4


def rank_log(folder: Path, rank: int) -> tuple[dict[int, list[str]], list[tuple[int, float]]]:
    """step -> the row digests this rank trained on, and its (step, logged loss) list."""
    rows: dict[int, list[str]] = {}
    losses = []
    for line in (folder / "ranks" / f"rank-{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "rows" in record:
            rows.setdefault(record["step"], []).extend(record["rows"])
        elif "loss" in record:
            losses.append((record["step"], record["loss"]))
    return rows, losses


def train(tmp_path: Path, cache_dir: Path, name: str, overrides: list[str]) -> Path:
    out = tmp_path / name
    proc = run_posttrain(*COMMON, *overrides, f"run.output_dir={out}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def stop_within_10_s(head: subprocess.Popen, log: Path) -> tuple[float, str]:
    """SIGTERM to the head: it exits 75 within 10 s, printing no traceback; (seconds, its log)."""
    signalled = time.monotonic()
    head.send_signal(signal.SIGTERM)
    assert head.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-4000:]
    seconds = time.monotonic() - signalled
    text = log.read_text(errors="replace")
    assert seconds <= 10, seconds
    assert "Traceback" not in text, text[-4000:]
    return seconds, text


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir) -> Path:
    return train(tmp_path_factory.mktemp("single"), cache_dir, "single", SINGLE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_workers_train_like_one_process_on_the_same_global_batch(variant, single, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    buffers_before = set(SHM.glob(SHM_BUFFERS))
    run = train(tmp_path, cache_dir, variant, [*VARIANTS[variant], *TWO, *DPO_ALONE])
    # DeepSpeed's CPU all-reduce buffers (64 MiB a rank) are gone once the workers end
    assert set(SHM.glob(SHM_BUFFERS)) <= buffers_before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    for stage in STAGES:
        folder = run / stage
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["world_size"] == 2

        # data order: the two ranks split the single process's rows of each step between them
        (rows0, losses0), (rows1, losses1) = rank_log(folder, 0), rank_log(folder, 1)
        alone, alone_losses = rank_log(single / stage, 0)
        assert sorted(rows0) == sorted(rows1) == sorted(alone) and len(alone) >= 4
        for step, expected in alone.items():
            assert not set(rows0[step]) & set(rows1[step]), f"{stage} step {step}: both ranks got the same row"
            assert sorted(rows0[step] + rows1[step]) == sorted(expected), f"{stage} step {step}: other rows"

        # losses: both ranks logged the same ones, and they follow the single process's
        assert losses0 == losses1 and len(losses0) == len(alone_losses)
        for (step, loss), (step_alone, loss_alone) in zip(losses0, alone_losses, strict=True):
            assert step == step_alone
            assert loss == pytest.approx(loss_alone, rel=LOSS_RTOL[stage]), f"{stage} step {step}"

    # the saved model is a plain Hugging Face model, close to the single process's
    model = AutoModelForCausalLM.from_pretrained(run / "align")
    reference = AutoModelForCausalLM.from_pretrained(single / "align")
    assert model.config.model_type == "llama"
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        probs, probs_alone = model(ids).logits.softmax(-1), reference(ids).logits.softmax(-1)
    assert (probs - probs_alone).abs().max() < PROBS_ATOL
    for stage in STAGES:  # DeepSpeed's json went next to the run, agreeing with the batch
        written = run / "launch" / f"deepspeed-{stage}.json"
        if "deepspeed=" in " ".join(VARIANTS[variant]):
            assert json.loads(written.read_text())["train_batch_size"] == 16
        else:
            assert not written.exists()


@pytest.mark.parametrize("variant", ["ddp_torchrun", "zero3_deepspeed"])
def test_a_stop_signal_to_the_head_checkpoints_every_rank_and_the_rerun_ends_where_one_run_would(
    variant, tmp_path, cache_dir
):
    """SIGTERM to `posttrain` (what Slurm sends): both workers save one checkpoint at the same
    step and exit, posttrain exits 75; the same command resumes and ends with the weights of a
    run that was never stopped. (torchrun starts its workers in sessions of their own: they learn
    of the signal from the stop file the head writes.)"""
    overrides = [
        *COMMON, *TWO, *VARIANTS[variant], "sft.max_steps=30", "sft.checkpoint_steps=5", "align.max_steps=3",
    ]  # fmt: skip
    stopped = tmp_path / "stopped"
    argv, env = posttrain_argv(*overrides, f"run.output_dir={stopped}", cache_dir=cache_dir)
    head = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_checkpoint = stopped / "sft" / "checkpoints" / "checkpoint-5" / "trainer_state.json"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and head.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    head.send_signal(signal.SIGTERM)
    output = head.communicate(timeout=300)[0]
    assert head.returncode == EXIT_PREEMPTED, output[-4000:]
    manifest = json.loads((stopped / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    stopped_at = int(Path(manifest["checkpoint"]).name.split("-")[1])
    assert 5 <= stopped_at < 30, "stopped at a checkpoint before the end"

    resumed = run_posttrain(*overrides, f"run.output_dir={stopped}", cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming {stopped / 'sft' / 'checkpoints' / f'checkpoint-{stopped_at}'}" in resumed.stdout
    once = train(tmp_path, cache_dir, "once", overrides)
    for stage in STAGES:
        weights = load_file(stopped / stage / "model.safetensors")
        expected = load_file(once / stage / "model.safetensors")
        worst = max((weights[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, f"{stage}: resumed weights differ by {worst:.2e}"


def test_lora_stages_merge_on_rank_0_under_zero2(tmp_path, cache_dir):
    """SFT -> ORPO with LoRA under ZeRO-2, 2 workers: every stage saves a merged plain model whose
    weights moved from its parent's, and the ranks still split each step's rows."""
    out = train(tmp_path, cache_dir, "lora", [*TWO, "peft=lora", "align=orpo", "deepspeed=zero2", "launcher=deepspeed"])
    parent = load_file(next((cache_dir / "models").glob("tiny-*/model.safetensors")))
    for stage in STAGES:
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["method"] == ("sft" if stage == "sft" else "orpo")
        weights = load_file(out / stage / "model.safetensors")
        assert set(weights) == set(parent), "a plain model, no adapter keys"
        moved = [k for k in parent if not torch.equal(weights[k], parent[k])]
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # model=tiny's
        assert moved and all(k.split(".")[-2] in targets for k in moved), "LoRA's target layers only"
        parent = weights
        (rows0, losses0), (rows1, losses1) = rank_log(out / stage, 0), rank_log(out / stage, 1)
        assert losses0 == losses1
        assert all(not set(rows0[s]) & set(rows1[s]) for s in rows0)


def test_a_stop_during_the_reference_pass_stops_every_rank_and_the_rerun_reuses_its_parts(tmp_path, cache_dir):
    """SIGTERM to the head while two DDP workers compute DPO's reference log-probs (a pass both
    ranks share, in parts of 4 batches): every rank stops at the same part within seconds,
    posttrain exits 75, and the same command reuses the parts written and finishes."""
    overrides = [
        *COMMON, *TWO, *VARIANTS["ddp_torchrun"],
        "data.builtin.num_preference=1200", "align.max_steps=60", "align.per_device_eval_batch_size=1",
        "run.reuse=true",  # the re-run reuses the complete SFT stage
    ]  # fmt: skip
    out = tmp_path / "run"
    argv, env = posttrain_argv(*overrides, f"run.output_dir={out}", cache_dir=cache_dir)
    log = tmp_path / "log.txt"
    head = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while "Computing reference log probs for train dataset:" not in log.read_text(errors="replace"):
        assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(2.0)
    assert head.poll() is None, "the pass ended before the signal"
    seconds, _ = stop_within_10_s(head, log)
    assert json.loads((out / "align" / "manifest.json").read_text())["status"] == "interrupted"
    parts = list((out / "sft" / "ref_logps").glob("*.parts/*"))
    assert parts, "the finished parts are on disk"

    resumed = run_posttrain(*overrides, f"run.output_dir={out}", cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    reused = [line for line in resumed.stdout.splitlines() if "parts reused" in line]
    assert reused and not reused[0].split("rows: ")[1].startswith("0 of"), resumed.stdout[-3000:]
    assert json.loads((out / "align" / "manifest.json").read_text())["status"] == "complete"
    print(f"\nstopped in {seconds:.2f} s; {reused[0]}")


@pytest.mark.parametrize("variant", ["ddp_torchrun", "zero3_deepspeed"])
def test_a_stop_during_grpo_generation_stops_every_rank_within_seconds_and_the_rerun_ends_where_one_run_would(
    variant, tmp_path, cache_dir
):
    """SIGTERM to the head while two workers sample GRPO's replies (long ones: most of a step is
    generation; under ZeRO-3 the ranks generate in lockstep, a collective per token): each rank's
    generation ends at the next token, the ranks agree and stop together within seconds,
    posttrain exits 75; the same command resumes from the last checkpoint and ends with the
    weights of a run that was never stopped."""
    overrides = [
        *COMMON, *TWO, *VARIANTS[variant],
        # from the base model, whose replies rarely end before max_completion_length
        "run.stages=[align]", "align=grpo", "align.init_from=base", "align.max_completion_length=256",
        "align.max_steps=6", "align.checkpoint_steps=2", "align.eval.num_prompts=8",
    ]  # fmt: skip
    out = tmp_path / "run"
    argv, env = posttrain_argv(*overrides, f"run.output_dir={out}", cache_dir=cache_dir)
    log = tmp_path / "log.txt"
    head = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    checkpoint = out / "align" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while read_json(checkpoint) is None:
        assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # into step 3's generation
    assert head.poll() is None, "the stage ended before the signal"
    seconds, text = stop_within_10_s(head, log)
    assert "during GRPO's generation (step 3)" in text, text[-4000:]
    assert json.loads((out / "align" / "manifest.json").read_text())["status"] == "interrupted"

    resumed = run_posttrain(*overrides, f"run.output_dir={out}", cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming {out / 'align' / 'checkpoints' / 'checkpoint-2'}" in resumed.stdout, resumed.stdout[-3000:]
    once = train(tmp_path, cache_dir, "once", overrides)
    weights, expected = load_file(out / "align" / "model.safetensors"), load_file(once / "align" / "model.safetensors")
    worst = max((weights[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-5, f"resumed GRPO weights differ by {worst:.2e}"
    print(f"\nstopped in {seconds:.2f} s during step 3's generation; resumed weights within {worst:.1e}")
