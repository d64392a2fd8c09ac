"""Crash anywhere (issue 30): a short default chain (SFT -> DPO with its reference pass and the
evaluations) is stopped at 10 points drawn at random from its whole time, and re-run after each;
the last re-run ends with the weights and metrics of a run that was never stopped.

    pytest -m slow tests/integration/test_crash_anywhere.py -s       # prints the seed and each point
    POSTTRAIN_STOP_SEED=7 pytest -m slow tests/integration/test_crash_anywhere.py -s   # replays seed 7

SIGKILL (node loss): any point; SIGTERM (preemption): each stop exits 75 within 10 s.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import FAST, posttrain_argv

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("POSTTRAIN_STOP_SEED", "30"))
POINTS = 10
# of which in the start-up (imports, Hydra, the plan): the rest fall in the stages
START_UP_POINTS = 2
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, float, float]:
    """The run never stopped: its folder, its seconds, and the seconds of its start-up (to loading data)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    started, start_up = time.monotonic(), None
    proc = _start(root / "run", root / "cache", root / "log.txt")
    while proc.poll() is None:
        if start_up is None and "[posttrain] loading data" in (root / "log.txt").read_text(errors="replace"):
            start_up = time.monotonic() - started
        time.sleep(0.05)
    assert proc.returncode == 0, (root / "log.txt").read_text()[-3000:]
    return root / "run", time.monotonic() - started, start_up or 0.0


def _delays(rng: random.Random, seconds: float, start_up: float) -> list[tuple[float, float]]:
    """(point of the uninterrupted run's time, delay after its attempt starts): POINTS points drawn
    over the whole run, sorted, START_UP_POINTS of them in its start-up (half the time of this short
    run) and the rest in the stages' work; a re-run repeats the start-up and then goes on about where
    the last attempt stopped, so a point past the start-up is reached start_up + (its distance from the last)."""
    points = [rng.uniform(0, start_up) for _ in range(START_UP_POINTS)]
    points = sorted(points + [rng.uniform(start_up, seconds) for _ in range(POINTS - START_UP_POINTS)])
    last, out = start_up, []
    for point in points:
        out.append((point, point if point <= start_up else start_up + point - last))
        last = max(last, point)
    return out


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
    reference, seconds, start_up = uninterrupted
    print(f"\n{sig.name} at {POINTS} random points of a {seconds:.1f} s run, seed {SEED} (POSTTRAIN_STOP_SEED)")
    out, cache, stops = tmp_path / "run", tmp_path / "cache", []
    for attempt, (point, delay) in enumerate(_delays(random.Random(SEED), seconds, start_up)):
        log = tmp_path / f"attempt-{attempt}.txt"
        proc = _start(out, cache, log)
        started = time.monotonic()
        try:
            proc.wait(timeout=delay)
            stops.append({"at": delay, "phase": "finished first", "exit": proc.returncode, "seconds": 0.0})
            print(f"  {attempt}: point {point:5.1f} s, after {delay:5.1f} s: the re-run finished first")
            assert proc.returncode == 0, log.read_text()[-3000:]
            continue
        except subprocess.TimeoutExpired:
            pass
        if sig == signal.SIGTERM:
            while not _catches_sigterm(proc.pid) and time.monotonic() - started < 5:
                time.sleep(0.01)  # the interpreter's own start-up, before posttrain's first line ran
        phase = _phase(log)
        signalled = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        stop = {"at": delay, "phase": phase, "exit": code, "seconds": time.monotonic() - signalled}
        stops.append(stop)
        print(
            f"  {attempt}: point {point:5.1f} s, {sig.name} after {delay:5.1f} s, in {phase}: "
            f"exit {code} in {stop['seconds']:.2f} s"
        )
        if sig == signal.SIGTERM:
            text = log.read_text(errors="replace")
            # a run that completed just before the signal took effect may exit 0
            assert code == 75 or (code == 0 and "[posttrain] done in" in text), (code, text[-3000:])
            assert stop["seconds"] <= STOP_SECONDS, stop
            assert "Traceback" not in text, text[-3000:]
    final = _start(out, cache, tmp_path / "final.txt")
    assert final.wait(timeout=600) == 0, (tmp_path / "final.txt").read_text()[-3000:]
    _assert_same_result(out, reference)
    return stops


def test_sigkill_at_random_points_then_reruns_end_as_an_uninterrupted_run(uninterrupted, tmp_path):
    _stop_at_random_points(signal.SIGKILL, uninterrupted, tmp_path)


def test_sigterm_at_random_points_exits_75_within_10_s_and_reruns_end_as_an_uninterrupted_run(uninterrupted, tmp_path):
    _stop_at_random_points(signal.SIGTERM, uninterrupted, tmp_path)
