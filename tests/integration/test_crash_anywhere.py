"""Crash anywhere (issue 30): a short default chain (SFT -> DPO with its reference pass and the
evaluations) is stopped at 10 random points, one in each of its phases, and re-run after each; the
last re-run ends with the weights and metrics of a run that was never stopped.

A point is a phase and a random offset within that phase's length in the uninterrupted run; each
attempt waits for the phase's first line in its own log (or a later phase's, where the earlier
attempts left the phase done) and is stopped that offset later. Phases of a tenth of a second
(evaluation, saving) would almost never be hit by points drawn over the whole run's time.

    pytest -m slow tests/integration/test_crash_anywhere.py -s       # prints the seed and each point
    POSTTRAIN_STOP_SEED=7 pytest -m slow tests/integration/test_crash_anywhere.py -s   # replays seed 7

SIGKILL (node loss): any point; SIGTERM (preemption): each stop exits 75 within 10 s.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import FAST, posttrain_argv

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("POSTTRAIN_STOP_SEED", "30"))
# the run's phases, in order, and the log line that starts each (None: the process's start)
PHASES = (
    ("start-up (imports, Hydra, the plan)", None),
    ("loading data", r"^\[posttrain\] loading data"),
    ("evaluating the base model", r"^\[posttrain\] evaluating base model"),
    ("sft: loading the model, tokenizing", r"^\[posttrain\] stage sft \(sft\) starting"),
    ("sft: training", r"(^|\r)sft: +\d+%"),
    ("sft: held-out loss, evaluating, saving", r"^\[posttrain\] stage sft: held-out loss"),
    ("align: loading the model, the reference pass", r"^\[posttrain\] stage align \(dpo\) starting"),
    ("align: training", r"(^|\r)align: +\d+%"),
    ("align: held-out loss, evaluating", r"^\[posttrain\] stage align: held-out loss"),
    ("align: saving, the summary", r"^\[posttrain\] stage align: saving"),
)
# frequent checkpoints, a reference pass in several parts (batches of 4 rows, 4 batches a part)
ARGS = [*FAST, "sft.checkpoint_steps=4", "align.checkpoint_steps=2", "align.per_device_eval_batch_size=4"]
# one thread per run: the same sums in the same order in every attempt (weights compared to 1e-6)
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STOP_SECONDS = 10


def _start(out: Path, cache: Path, log: Path) -> subprocess.Popen:
    argv, env = posttrain_argv(f"run.output_dir={out}", *ARGS, cache_dir=cache)
    return subprocess.Popen(argv, env={**env, **ENV}, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _phase(log: Path) -> str:
    """Where the run was: its last `[posttrain]` line, or `start-up` before the first."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("[posttrain]")]
    return lines[-1][len("[posttrain] ") :][:90] if lines else "start-up (imports, Hydra, the plan)"


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has set its SIGTERM handler (the interpreter's first ~0.1 s: not yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _metrics(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "manifest.json").read_text())["metrics"]


def _phases_begun(log: Path) -> list[bool]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [marker is None or re.search(marker, text, re.M) is not None for _, marker in PHASES]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[float]]:
    """The run never stopped: its folder and the seconds each phase lasted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    started, begun_at, done_at = time.monotonic(), [0.0] + [None] * (len(PHASES) - 1), None
    proc = _start(root / "run", root / "cache", root / "log.txt")
    while proc.poll() is None:
        if done_at is None and "\n[posttrain] done in" in (root / "log.txt").read_text(errors="replace"):
            done_at = time.monotonic() - started
        for phase, begun in enumerate(_phases_begun(root / "log.txt")):
            if begun and begun_at[phase] is None:
                begun_at[phase] = time.monotonic() - started
        time.sleep(0.01)
    assert proc.returncode == 0, (root / "log.txt").read_text()[-3000:]
    assert None not in begun_at, ("a phase's first line never appeared", begun_at)
    # the last phase ends at the run's last line (then the interpreter exits: nothing to stop)
    done = (root / "log.txt").read_text(errors="replace").count("\n[posttrain] done in")
    assert done == 1, "the run's last line changed"
    ends = [*begun_at[1:], done_at]
    return root / "run", [end - begin for begin, end in zip(begun_at, ends, strict=True)]


def _wait_for_phase(proc: subprocess.Popen, log: Path, phase: int) -> bool:
    """Wait until the attempt reached `phase` or a later one; False: it ended first."""
    while proc.poll() is None:
        if any(_phases_begun(log)[phase:]):
            return True
        time.sleep(0.01)
    return False


def _current_phase(log: Path) -> str:
    begun = _phases_begun(log)
    return PHASES[max(i for i, b in enumerate(begun) if b)][0]


def _assert_same_result(out: Path, reference: Path) -> None:
    for stage in ("sft", "align"):
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "complete"
        mine, theirs = _weights(out / stage), _weights(reference / stage)
        assert mine.keys() == theirs.keys()
        difference = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
        assert difference <= 1e-6, (stage, difference)
        assert _metrics(out, stage)["exact_match"] == _metrics(reference, stage)["exact_match"], stage
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    for stage in ("base", "sft", "align"):
        assert summary["stages"][stage]["metrics"]["exact_match"] == expected["stages"][stage]["metrics"]["exact_match"]


def _stop_at_random_points(sig: signal.Signals, uninterrupted, tmp_path: Path) -> list[dict]:
    reference, lengths = uninterrupted
    rng = random.Random(SEED)
    print(f"\n{sig.name} at a random point of each of {len(PHASES)} phases, seed {SEED} (POSTTRAIN_STOP_SEED)")
    out, cache, stops = tmp_path / "run", tmp_path / "cache", []
    for attempt, ((name, _), length) in enumerate(zip(PHASES, lengths, strict=True)):
        offset = rng.uniform(0, length)
        log = tmp_path / f"attempt-{attempt}.txt"
        proc = _start(out, cache, log)
        started = time.monotonic()
        running = _wait_for_phase(proc, log, attempt)
        try:
            proc.wait(timeout=offset)
            running = False
        except subprocess.TimeoutExpired:
            pass
        if not running:
            stops.append({"phase": name, "exit": proc.wait(), "seconds": 0.0})
            print(f"  {attempt}: {name} + {offset:.2f} s of {length:.2f} s: the re-run finished first")
            assert proc.returncode == 0, log.read_text()[-3000:]
            continue
        if sig == signal.SIGTERM:
            while not _catches_sigterm(proc.pid) and time.monotonic() - started < 5:
                time.sleep(0.01)  # the interpreter's own start-up, before posttrain's first line ran
        phase, last_line = _current_phase(log), _phase(log)
        signalled = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        stop = {"phase": phase, "exit": code, "seconds": time.monotonic() - signalled}
        stops.append(stop)
        print(
            f"  {attempt}: {name} + {offset:.2f} s of {length:.2f} s: {sig.name} after {signalled - started:.1f} s "
            f"in {stop['phase']} (last line: {last_line}): exit {code} in {stop['seconds']:.2f} s"
        )
        if sig == signal.SIGTERM:
            text = log.read_text(errors="replace")
            # a run that completed just before the signal took effect may exit 0
            assert code == 75 or (code == 0 and "[posttrain] done in" in text), (code, text[-3000:])
            assert stop["seconds"] <= STOP_SECONDS, stop
            assert "Traceback" not in text, text[-3000:]
    print(f"  phases stopped in: {len({s['phase'] for s in stops if s['seconds']})} of {len(PHASES)}")
    final = _start(out, cache, tmp_path / "final.txt")
    assert final.wait(timeout=600) == 0, (tmp_path / "final.txt").read_text()[-3000:]
    _assert_same_result(out, reference)
    return stops


def test_sigkill_at_random_points_then_reruns_end_as_an_uninterrupted_run(uninterrupted, tmp_path):
    _stop_at_random_points(signal.SIGKILL, uninterrupted, tmp_path)


def test_sigterm_at_random_points_exits_75_within_10_s_and_reruns_end_as_an_uninterrupted_run(uninterrupted, tmp_path):
    _stop_at_random_points(signal.SIGTERM, uninterrupted, tmp_path)
