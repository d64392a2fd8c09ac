"""Crashes, preemption and re-runs: a re-run finishes the job, reuses what was complete, and
ends with the same model as a run that was never interrupted."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain import artifacts
from tests.conftest import FAST, posttrain_argv, run_posttrain

# checkpoints often enough that a kill lands between two of them
CHECKPOINTS = ["sft.checkpoint_steps=4", "align.checkpoint_steps=2"]
# resumed runs restore model, optimizer, scheduler, RNG and data position: on one machine the
# result is bit-identical (measured max |difference| 0.0); the tolerance allows for other BLAS builds
TOLERANCE = 1e-5


def _start(out: Path, cache: Path, *extra: str, log: Path) -> subprocess.Popen:
    argv, env = posttrain_argv(f"run.output_dir={out}", *FAST, *CHECKPOINTS, *extra, cache_dir=cache)
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the point where the test stops it"
        assert time.time() < deadline, "timed out waiting for the run to get there"
        time.sleep(0.005)


def _rerun(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_posttrain(f"run.output_dir={out}", *FAST, *CHECKPOINTS, *extra, cache_dir=cache)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


SECRET = "hf_NotARealToken1234567"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run on its own cache (with a hub token in its environment and its run name)."""
    root = tmp_path_factory.mktemp("reference")
    argv, env = posttrain_argv(
        f"run.output_dir={root / 'run'}", *FAST, *CHECKPOINTS, f"run.name=run-{SECRET}", cache_dir=root / "cache"
    )
    proc = subprocess.run(argv, env={**env, "HF_TOKEN": SECRET}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_no_secret_is_written_anywhere(reference):
    written = [p for p in reference.parent.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert any(p.name == "overrides.yaml" for p in written) and any(p.name == "manifest.json" for p in written)
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    assert "run-***" in (reference / "resolved.yaml").read_text()


def test_manifest_records_provenance(reference):
    manifest = _manifest(reference / "align")
    assert manifest["parent"]["key"] == _manifest(reference / "sft")["key"]
    assert manifest["data"]["fingerprint"] and manifest["content"]["stage"]["beta"] == 0.1
    assert manifest["world_size"] == 1 and manifest["hosts"] == 1 and manifest["host"]
    assert manifest["versions"]["trl"].startswith("1.")
    assert manifest["recipe_commit"] is None or len(manifest["recipe_commit"]["commit"]) == 40
    assert manifest["attempts"][0]["finished"] > manifest["attempts"][0]["started"]
    assert manifest["metrics"]["train_loss"] > 0 and manifest["files"]["model.safetensors"] > 0


def _checkpoint_written(folder: Path, step: int):
    """The checkpoint's trainer_state.json (written last) exists and parses: not cut short."""
    return lambda: artifacts.read_json(folder / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json") is not None


KILL_POINTS = {
    # name: (when to kill -9, status of sft and align in the re-run's summary)
    "during_sft": (lambda out: _checkpoint_written(out / "sft", 8), ("resumed", "trained")),
    "between_stages": (lambda out: lambda: (out / "align" / "manifest.json").exists(), ("reused", "trained")),
    "during_dpo": (lambda out: _checkpoint_written(out / "align", 4), ("reused", "resumed")),
    "while_saving_dpo": (lambda out: lambda: (out / "align" / "model.safetensors").exists(), ("reused", "resumed")),
}


# one kill point in the default run, the rest with -m slow (each costs a run and a re-run)
@pytest.mark.parametrize(
    "point", [p if p == "during_dpo" else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS]
)
def test_kill_9_then_rerun_matches_an_uninterrupted_run(point, reference, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    condition, expected = KILL_POINTS[point]
    proc = _start(out, cache, log=tmp_path / "log.txt")
    _wait_for(condition(out), proc)
    proc.kill()
    proc.wait()

    rerun = _rerun(out, cache)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stages"]["sft"]["status"], summary["stages"]["align"]["status"]) == expected, rerun.stdout
    for stage in ("sft", "align"):
        assert _manifest(out / stage)["status"] == "complete"
        assert not (out / stage / "checkpoints").exists()
        assert _max_difference(out / stage, reference / stage) <= TOLERANCE, stage
        loss, reference_loss = (_manifest(f / stage)["metrics"]["train_loss"] for f in (out, reference))
        assert loss == pytest.approx(reference_loss, abs=1e-4), stage  # the whole stage's mean, not the tail's
    # the logged curve has each step once, as if the run had never stopped
    for stage in ("sft", "align"):
        records = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] == records[-1]["step"], (stage, steps)


def test_sigterm_saves_a_checkpoint_and_exits_for_requeue(reference, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    # no periodic checkpoints: the only checkpoint is the one the signal asks for
    proc = _start(out, cache, "sft.checkpoint_steps=0", log=tmp_path / "log.txt")
    metrics = out / "sft" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    log = (tmp_path / "log.txt").read_text()
    assert "SIGTERM received" in log and "re-run the same command to resume" in log
    manifest = _manifest(out / "sft")
    assert manifest["status"] == "interrupted"
    step = int(Path(manifest["checkpoint"]).name.split("-")[1])
    assert 4 <= step < 12

    show = subprocess.run(posttrain_argv("show", str(out), cache_dir=cache)[0], capture_output=True, text=True)
    assert show.returncode == 0 and f"interrupted at checkpoint-{step}" in show.stdout

    _rerun(out, cache, "sft.checkpoint_steps=0")
    assert _manifest(out / "sft")["attempts"][1]["resumed_from"].endswith(f"checkpoint-{step}")
    for stage in ("sft", "align"):
        assert _max_difference(out / stage, reference / stage) <= TOLERANCE, stage


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_same_command_with_the_default_timestamped_folder_resumes_where_it_stopped(tmp_path):
    """Without run.output_dir each run gets a new folder: the re-run finds the stopped stage by its key."""
    argv, env = posttrain_argv(*FAST, *CHECKPOINTS, cache_dir=tmp_path / "cache")
    runs = tmp_path / "outputs" / "tiny_sft_dpo"
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(lambda: any(runs.glob("*/align/checkpoints/checkpoint-4/trainer_state.json")), proc)
    proc.kill()
    proc.wait()
    time.sleep(1.1)  # the next run's timestamp differs

    rerun = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    first, second = sorted(runs.iterdir())
    assert (second / "sft").resolve() == first / "sft" and (second / "align").resolve() == first / "align"
    summary = json.loads((second / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"].values()] == ["base", "reused", "resumed"]
    assert _manifest(first / "align")["status"] == "complete"


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_changed_config_does_not_resume_an_incompatible_checkpoint(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = _start(out, cache, log=tmp_path / "log.txt")
    _wait_for(_checkpoint_written(out / "sft", 4), proc)
    proc.kill()
    proc.wait()
    show = subprocess.run(posttrain_argv("show", str(out), cache_dir=cache)[0], capture_output=True, text=True)
    assert "crashed, resumable from checkpoint-" in show.stdout

    changed = run_posttrain(f"run.output_dir={out}", *FAST, *CHECKPOINTS, "sft.learning_rate=1e-3", cache_dir=cache)
    assert changed.returncode == 1
    assert changed.stderr.strip().splitlines()[-1] == (
        f"error: run.output_dir: {out / 'sft'} holds an unfinished stage with a different config "
        "(changed: stage.learning_rate); its checkpoint cannot be resumed: set run.resume=false to discard it, "
        "or choose a new run.output_dir"
    )
    fresh = run_posttrain(
        f"run.output_dir={out}",
        *FAST,
        *CHECKPOINTS,
        "sft.learning_rate=1e-3",
        "run.resume=false",
        "plan=true",
        cache_dir=cache,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert "train" in fresh.stdout.split("sft: sft")[1].splitlines()[1]


def test_concurrent_run_into_the_same_folder_is_refused(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = _start(out, cache, log=tmp_path / "log.txt")
    try:
        _wait_for(lambda: (out / "sft" / "manifest.json").exists(), first)
        second = run_posttrain(f"run.output_dir={out}", *FAST, *CHECKPOINTS, cache_dir=cache)
        assert second.returncode == 1
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: run folder {out} is in use by pid {first.pid} on ")
        assert last.endswith("; wait for it to finish or choose another run.output_dir")
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_damaged_or_unfinished_artifacts_are_not_reused(reference, tmp_path):
    """A copy of the reference run's cache index, pointing at copies we break on purpose."""
    cache = tmp_path / "cache"
    shutil.copytree(reference.parent / "cache", cache, symlinks=True)
    broken = tmp_path / "broken"
    shutil.copytree(reference, broken, symlinks=True)
    keys = {stage: _manifest(broken / stage)["key"] for stage in ("sft", "align")}
    for stage, key in keys.items():
        (cache / "stages" / f"{key}.json").write_text(json.dumps({"path": str(broken / stage)}))

    def plan() -> str:
        proc = run_posttrain(f"run.output_dir={tmp_path / 'new'}", *FAST, *CHECKPOINTS, "plan=true", cache_dir=cache)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert plan().count("reuse complete") == 2
    model = broken / "align" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    assert "not reusing" in plan() and plan().count("reuse complete") == 1
    manifest = _manifest(broken / "sft")
    (broken / "sft" / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))  # never finished
    assert plan().count("reuse complete") == 0
    (broken / "sft" / "manifest.json").write_text('{"status": "comp')  # cut short
    assert plan().count("reuse complete") == 0


def _file_size_limit(limit: int):
    """A full disk, as far as the run can tell: writes past `limit` bytes fail (EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_a_failed_save_is_one_error_and_leaves_earlier_stages_intact(reference, tmp_path):
    first, out, cache = reference, tmp_path / "run", tmp_path / "cache"
    shutil.copytree(reference.parent / "cache", cache, symlinks=True)  # its index points at the reference run
    before = {name: (first / "sft" / name).read_bytes() for name in ("manifest.json", "model.safetensors")}

    # SFT is reused from the first run; the new align stage trains, then cannot save its 3.6 MB of weights
    args = (f"run.output_dir={out}", *FAST, *CHECKPOINTS, "align.beta=0.3", "align.checkpoint_steps=0")
    argv, env = posttrain_argv(*args, cache_dir=cache)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, preexec_fn=_file_size_limit(1_000_000))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: saving stage align to {out / 'align'} failed: ") and "File too large" in last
    assert last.endswith(
        "it is not marked complete and earlier stages are intact: free space (or fix the folder) "
        "and re-run the same command"
    )
    assert (out / "sft").resolve() == first / "sft"
    assert {name: (first / "sft" / name).read_bytes() for name in before} == before
    assert _manifest(out / "align")["status"] == "failed"

    assert run_posttrain(*args, cache_dir=cache).returncode == 0
    assert _manifest(out / "align")["status"] == "complete"
