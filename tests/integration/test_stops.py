"""A stop signal in every long phase (issue 30): the run exits 75 within 10 s, marks nothing
complete that is not, and the same command then ends the run, reusing what the stop kept.

    pytest -m slow tests/integration/test_stops.py -s     # prints the table: phase, signal, seconds, exit, reused
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, posttrain_argv

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CHECKPOINTS = ["sft.checkpoint_steps=4", "align.checkpoint_steps=2"]
# many held-out prompts and long replies: evaluation takes seconds on the tiny model
LONG_EVAL = ["data.builtin.num_test=512", "sft.eval.num_prompts=512", "sft.eval.max_new_tokens=64"]
# an on-policy round: SFT, then the pairs stage samples replies from it
PAIRS = ["recipe=tiny_sft_onpolicy_dpo", "run.stages=[sft,pairs]"]
# the built-in Llama at 103M parameters (hidden 1024, 8 layers): its 412 MB take ~1.5 s to save
LARGER = [
    "model.tiny.hidden_size=1024",
    "model.tiny.intermediate_size=2816",
    "model.tiny.num_layers=8",
    "model.tiny.num_heads=16",
]

# phase: (signal, extra arguments, the log text that starts it, seconds after it, what the re-run must say)
PHASES = {
    "start-up (imports, Hydra, plan)": (signal.SIGTERM, [], "stages:", 0.0, "starting from base"),
    "loading data": (signal.SIGUSR1, ["data.builtin.num_sft=40000"], "[posttrain] loading data", 0.3, ""),
    "base model evaluation": (signal.SIGTERM, LONG_EVAL, "evaluating base model", 0.5, ""),
    "SFT training steps": (signal.SIGTERM, [], "sft:   0%", 0.3, "resuming"),
    "SFT evaluation": (signal.SIGUSR1, LONG_EVAL, "stage sft: evaluating", 0.5, "evaluating the saved model"),
    # the stage was saved before its evaluation: kept even where complete stages are not reused
    "SFT evaluation, run.reuse=false": (
        signal.SIGTERM,
        [*LONG_EVAL, "run.reuse=false"],
        "stage sft: evaluating",
        0.5,
        "evaluating the saved model",
    ),
    "DPO reference pass": (
        signal.SIGTERM,
        ["data.builtin.num_preference=1200", "align.max_steps=60", "align.per_device_eval_batch_size=1"],
        "Computing reference log probs for train dataset:",
        1.5,
        "parts reused",
    ),
    "the pairs stage's sampling": (
        signal.SIGUSR1,
        # 5 batches of ~2 s; one sampled batch (a checkpoint each) is kept
        [*PAIRS, "pairs.num_prompts=256", "pairs.max_new_tokens=32", "pairs.checkpoint_steps=1"],
        "pairs:   0%",
        5.0,
        "stage pairs (pairs) resuming",
    ),
    "saving a 100M model": (
        signal.SIGTERM,
        [*LARGER, "run.stages=[sft]", "sft.max_steps=2"],
        "stage sft: saving",
        0.3,
        "starting from base",  # no checkpoint before the last step: the stage starts again
    ),
    "GRPO generation": (
        signal.SIGTERM,
        # from the base model, whose replies run to max_completion_length: most of a step is generation
        [
            "run.stages=[align]",
            "align=grpo",
            "align.init_from=base",
            "align.max_completion_length=256",
            "align.per_device_train_batch_size=8",
            "align.max_steps=40",
        ],
        "align:   0%",
        0.3,  # steps of ~1.2 s, ~1 s of it generation
        "stage align (grpo) starting from base",  # the first step is redone
    ),
}
TABLE: list[str] = []


def _argv(out: Path, cache: Path, extra: list[str]):
    argv, env = posttrain_argv(f"run.output_dir={out}", *FAST, *CHECKPOINTS, *extra, cache_dir=cache)
    return argv, {**env, **ENV}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_stop_in_each_phase_exits_75_within_10_s_and_the_rerun_finishes(phase, tmp_path):
    sig, extra, starts, after, rerun_says = PHASES[phase]
    out, cache, log = tmp_path / "run", tmp_path / "cache", tmp_path / "log.txt"
    argv, env = _argv(out, cache, extra)
    proc = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while starts not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"ended before {starts!r}: " + log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(after)
    assert proc.poll() is None, "the phase ended before the signal"
    signalled = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    seconds = time.monotonic() - signalled
    text = log.read_text(errors="replace")
    assert code == 75, text[-3000:]
    assert seconds <= 10, seconds
    assert "re-run the same command to resume" in text and "Traceback" not in text
    for manifest in out.glob("*/manifest.json"):  # nothing unfinished looks complete
        state = json.loads(manifest.read_text())
        assert state["status"] == "complete" or "model.safetensors" not in state.get("files", {})
    stopped_by = [line for line in text.splitlines() if line.startswith("[posttrain] stopped by")][-1]

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    said = rerun.stdout + rerun.stderr
    assert rerun_says in said, said[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    statuses = ", ".join(f"{name} {s['status']}" for name, s in summary["stages"].items() if name != "base")
    lines = [line[len("[posttrain] ") :] for line in said.splitlines() if line.startswith("[posttrain] ")]
    reused = [line for line in lines if "reused" in line or "resuming" in line]
    TABLE.append(
        f"| {phase} | {sig.name} | {seconds:.2f} | {code} | {statuses}; {'; '.join(reused) or 'redone'} "
        f"| {stopped_by[len('[posttrain] stopped by ') :]} |"
    )
    print("\n" + "\n".join(["| phase | signal | seconds to exit | exit | re-run | stopped by |", *TABLE]))
