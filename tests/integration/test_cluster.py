"""Real Slurm jobs on a real (two-node, one-machine) cluster: `sudo .ci/slurm_up && pytest -m cluster`.

Every test submits with sbatch and waits for the jobs; the run folders and the cache sit in
pytest's tmp_path (the nodes share this machine's disk). Where sbatch or the nodes are missing,
every test skips and says why.

- one node (launch/slurm.sbatch): stopped mid-SFT by SIGUSR1, requeued by the script, resumed,
  and ends with the weights of a run that was never stopped;
- two nodes (launch/slurm_multinode.sbatch): one torchrun per node, SFT -> DPO, preempted once,
  requeued, complete; the two ranks ran on node1 and node2 and trained on disjoint rows;
- a sweep through hydra-submitit (conf/hydra/launcher/posttrain_slurm.yaml): one Slurm job per
  point, one SFT trained and reused by the other point, the sweep report written;
- DeepSpeed ZeRO-2 across the two nodes: srun starts `deepspeed --no_ssh` on each node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.distributed import free_port
from tests.conftest import REPO, posttrain_argv
from tests.integration.test_distributed import rank_log

pytestmark = pytest.mark.cluster

PARTITION = "ci"  # .ci/slurm_up's
NODES = ("node1", "node2")
SMALL = [
    "data.builtin.num_sft=320",
    "data.builtin.num_preference=160",
    "data.builtin.num_test=32",
    "sft.learning_rate=2e-3",
    "sft.logging_steps=1",
    "sft.eval.num_prompts=16",
    "sft.eval.num_loss_rows=16",
    "align.learning_rate=3e-4",
    "align.logging_steps=1",
    "align.eval.num_prompts=16",
    "align.eval.num_loss_rows=16",
]
# resumed runs restore model, optimizer, scheduler, RNG and data position (tests/integration/test_resume.py)
TOLERANCE = 1e-6
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _cluster_problem() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    missing = [tool for tool in ("sbatch", "sinfo", "squeue", "scontrol", "scancel") if not shutil.which(tool)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not on PATH); run `sudo .ci/slurm_up`"
    try:
        listed = subprocess.run(
            ["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: slurmctld is not running; run `sudo .ci/slurm_up`"
    if listed.returncode != 0:
        return f"the cluster is not up (sinfo: {listed.stderr.strip()}); run `sudo .ci/slurm_up`"
    states = dict(line.split() for line in listed.stdout.splitlines() if line.strip())
    usable = [n for n in NODES if states.get(n, "").rstrip("*") in ("idle", "mix", "alloc")]
    if len(usable) < len(NODES):
        return f"partition {PARTITION} should have nodes {', '.join(NODES)} up; sinfo says {states or 'none'}"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    if problem := _cluster_problem():
        pytest.skip(problem)


@pytest.fixture
def jobs():
    """Job ids a test submitted; whatever is still queued when it ends is cancelled."""
    submitted: list[str] = []
    yield submitted
    if submitted:
        subprocess.run(["scancel", *submitted], capture_output=True)


def job_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The environment the jobs get (--export=ALL): this interpreter's posttrain first on PATH, one
    thread per process on a small machine, the session's cache."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "POSTTRAIN_CACHE": str(cache_dir),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        **extra,
    }


def sbatch(script: Path, options: list[str], overrides: list[str], env: dict[str, str], jobs: list[str]) -> str:
    """Submit `script` with its #SBATCH lines overridden where this machine differs; the job id."""
    command = ["sbatch", "--parsable", "--export=ALL", f"--partition={PARTITION}", "--gpus-per-node=0", *options]
    proc = subprocess.run([*command, str(script), *overrides], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    jobs.append(job_id)
    return job_id


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def start_requeued_now(job_id: str, info: dict[str, str]) -> None:
    """Slurm holds a requeued job for two minutes (BeginTime); the tests start it at once."""
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)


def wait_for_job(job_id: str, log: Path, timeout: float = 480) -> dict[str, str]:
    """Wait until the job (and its requeues) ended; its last `scontrol show job`."""
    deadline = time.time() + timeout
    while True:
        info = job_info(job_id)
        if info.get("JobState") in ENDED:
            return info
        start_requeued_now(job_id, info)
        assert time.time() < deadline, f"job {job_id} still {info.get('JobState')}:\n{_tail(log)}"
        time.sleep(1)


def wait_for_file(path: Path, job_id: str, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        state = job_info(job_id).get("JobState")
        assert state not in ENDED, f"job {job_id} {state} before {path} appeared:\n{_tail(log)}"
        assert time.time() < deadline, f"{path} did not appear in {timeout:.0f} s:\n{_tail(log)}"
        time.sleep(0.5)


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text()[-chars:] if log.exists() else f"(no {log})"


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_two_nodes_split_the_rows(stage: Path) -> None:
    """Rank 0 ran on node1 and rank 1 on node2, and at every step they trained on different rows."""
    (rows0, _), (rows1, _) = rank_log(stage, 0), rank_log(stage, 1)
    assert sorted(rows0) == sorted(rows1) and rows0, f"{stage.name}: the ranks logged different steps"
    for step in rows0:
        assert not set(rows0[step]) & set(rows1[step]), f"{stage.name} step {step}: both ranks got the same row"
    nodes = [
        {json.loads(line).get("node") for line in (stage / "ranks" / f"rank-{r}.jsonl").read_text().splitlines()}
        - {None}
        for r in (0, 1)
    ]
    assert nodes == [{"node1"}, {"node2"}], f"{stage.name}: ranks ran on {nodes}"


# --- one node: slurm.sbatch, SIGUSR1, requeue, resume --------------------------------------

ONE_NODE = [*SMALL, "sft.max_steps=30", "sft.checkpoint_steps=5", "sft.per_device_train_batch_size=16",
            "align.max_steps=2", "align.per_device_train_batch_size=16", "run.reuse=false"]  # fmt: skip


def test_a_job_signalled_mid_sft_is_requeued_and_ends_with_the_uninterrupted_weights(tmp_path, cache_dir, jobs):
    run, log = tmp_path / "run", tmp_path / "job.out"
    options = ["--nodes=1", "--cpus-per-task=1", "--time=20", f"--output={log}", f"--chdir={tmp_path}"]
    job = sbatch(REPO / "launch" / "slurm.sbatch", options, [*ONE_NODE, f"run.output_dir={run}"],
                 job_env(cache_dir), jobs)  # fmt: skip
    wait_for_file(run / "sft" / "checkpoints" / "checkpoint-5" / "trainer_state.json", job, log)
    # what `#SBATCH --signal=USR1@120` does before the time limit: SIGUSR1 to the job's steps
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    info = wait_for_job(job, log)

    output = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    assert f"requeueing job {job}" in output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["stages"]["sft"]["status"] == "resumed", "the requeued job resumed SFT from its checkpoint"
    assert "resuming " in output and "/sft/checkpoints/checkpoint-" in output

    once = tmp_path / "once"
    argv, _ = posttrain_argv(*ONE_NODE, f"run.output_dir={once}", cache_dir=cache_dir)
    proc = subprocess.run(argv, env=job_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("sft", "align"):
        worst = max_difference(run / stage, once / stage)
        assert worst <= TOLERANCE, f"{stage}: the requeued job's weights differ by {worst:.2e}"
