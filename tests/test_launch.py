"""launch/ scripts: valid bash, and the Slurm template requeues exactly when posttrain was preempted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from posttrain.preemption import EXIT_PREEMPTED
from tests.conftest import REPO

SBATCH = REPO / "launch" / "slurm.sbatch"


def test_slurm_template_is_valid_bash_and_starts_with_its_command():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    assert SBATCH.read_text().splitlines()[1].startswith("# sbatch launch/slurm.sbatch ")
    assert f"EXIT_PREEMPTED={EXIT_PREEMPTED}\n" in SBATCH.read_text()


def _fake_tools(bin_dir: Path, posttrain_exit: int) -> None:
    """srun runs its command; posttrain exits as told; scontrol records its arguments."""
    bin_dir.mkdir()
    tools = {
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"',
        "posttrain": f'echo "posttrain $*" >> "$CALLS"; exit {posttrain_exit}',
        "scontrol": 'echo "scontrol $*" >> "$CALLS"',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize(("posttrain_exit", "script_exit", "requeued"), [(75, 0, True), (0, 0, False), (1, 1, False)])
def test_slurm_template_requeues_only_a_preempted_run(tmp_path, posttrain_exit, script_exit, requeued):
    _fake_tools(tmp_path / "bin", posttrain_exit)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": "42"}
    proc = subprocess.run(["bash", str(SBATCH), "recipe=tiny_sft_dpo", "run.output_dir=/x"], env=env)
    assert proc.returncode == script_exit
    expected = ["posttrain recipe=tiny_sft_dpo run.output_dir=/x", *(["scontrol requeue 42"] if requeued else [])]
    assert calls.read_text().splitlines() == expected
