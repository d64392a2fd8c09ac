"""kill -9 in the middle of the real model's SFT, then the same command again: it resumes from the
last checkpoint and ends with the weights of the shared SFT, which ran uninterrupted."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import posttrain_argv
from tests.integration.test_resume import TOLERANCE, _checkpoint_written, _max_difference, _wait_for
from tests.real_model.conftest import posttrain_real, real_overrides

pytestmark = pytest.mark.real_model

# the shared SFT's stage with a checkpoint after each step (not in the key); run.reuse=false: train it
# here rather than reuse the shared one, and resume this folder's checkpoint
KILLED = ["run.stages=[sft]", "sft.checkpoint_steps=1", "run.reuse=false"]


def test_kill_9_mid_stage_then_rerun_matches_the_uninterrupted_sft(real_sft, real_cache, tmp_path):
    out = tmp_path / "run"
    argv, env = posttrain_argv(*real_overrides(out, real_cache, *KILLED), cache_dir=real_cache)
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(_checkpoint_written(out / "sft", 1), proc)
    proc.kill()
    proc.wait()
    assert json.loads((out / "sft" / "manifest.json").read_text())["status"] != "complete"

    rerun = posttrain_real(out, real_cache, *KILLED)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resuming {out / 'sft' / 'checkpoints' / 'checkpoint-1'}" in rerun.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["sft"]["status"] == "resumed"
    assert not (out / "sft" / "checkpoints").exists()
    assert _max_difference(out / "sft", real_sft / "sft") <= TOLERANCE
