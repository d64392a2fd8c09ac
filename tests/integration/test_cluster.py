"""Real Slurm jobs on a real (two-node, one-machine) cluster: `sudo .ci/slurm_up && pytest -m cluster`.

Every test submits with sbatch and waits for the jobs; the run folders and the cache sit in
pytest's tmp_path (the nodes share this machine's disk). Where sbatch or the nodes are missing,
every test skips and says why.

- one node (launch/slurm.sbatch): stopped mid-SFT by SIGUSR1 (to the job's steps, or to the
  batch shell), requeued by the script, resumed, and ends with the weights of a run that was
  never stopped;
- two nodes (launch/slurm_multinode.sbatch): one torchrun (DDP) or one DeepSpeed launcher
  (ZeRO-2, `deepspeed --no_ssh` started by srun) per node, SFT -> DPO, preempted once, requeued,
  complete; the two ranks ran on node1 and node2 and trained on disjoint rows;
- a sweep through hydra-submitit (conf/hydra/launcher/posttrain_slurm.yaml): one Slurm job per
  point, one SFT trained and reused by the other point, the sweep report written.
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

from posttrain.distributed import free_port
from tests.conftest import REPO, posttrain_argv
from tests.integration.test_distributed import rank_log
from tests.integration.test_resume import _max_difference

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
        return "sinfo did not answer in 20 s (no slurmctld reachable); run `sudo .ci/slurm_up`"
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
    """Slurm holds a requeued job for two minutes (BeginTime); the tests start it a few seconds
    after the requeue instead. Not in the same second: slurmd refuses a job whose credential is no
    newer than the revoked one of its previous run ("Job credential revoked", and the job fails)."""
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        time.sleep(3)
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


def wait_for_checkpoint(stage: Path, job_id: str, log: Path, timeout: float = 300) -> None:
    """Wait until training saved a checkpoint (the stage has steps left after it to stop in)."""
    deadline = time.time() + timeout
    checked = 0.0
    while not any((stage / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        if time.time() - checked > 2:  # scontrol is slower than a few steps of the tiny model
            state, checked = job_info(job_id).get("JobState"), time.time()
            assert state not in ENDED, f"job {job_id} {state} before a checkpoint of {stage.name}:\n{_tail(log)}"
        assert time.time() < deadline, f"no checkpoint of {stage.name} in {timeout:.0f} s:\n{_tail(log)}"
        time.sleep(0.05)


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text()[-chars:] if log.exists() else f"(no {log})"


def _nodes(stage: Path, rank: int) -> dict[int, str]:
    """step -> the node that rank trained it on (a requeued job may place the ranks anew)."""
    lines = (stage / "ranks" / f"rank-{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r["node"] for r in map(json.loads, lines) if "node" in r}


def assert_two_nodes_split_the_rows(stage: Path, steps_per_epoch: int) -> None:
    """At every step the two ranks ran on different nodes (node1, node2); at every step of the
    first epoch, where the stop and the resume fall, they trained on different rows. (Later epochs
    reshuffle the same rows, and the built-in tasks hold a few rows twice: two equal rows may then
    meet in one step, which their digests cannot tell from one row trained twice.)"""
    (rows0, _), (rows1, _) = rank_log(stage, 0), rank_log(stage, 1)
    assert sorted(rows0) == sorted(rows1) and rows0, f"{stage.name}: the ranks logged different steps"
    nodes0, nodes1 = _nodes(stage, 0), _nodes(stage, 1)
    for step in rows0:
        assert {nodes0[step], nodes1[step]} == set(NODES), f"{stage.name} step {step}: {nodes0[step]}, {nodes1[step]}"
        if step <= steps_per_epoch:
            assert not set(rows0[step]) & set(rows1[step]), f"{stage.name} step {step}: both ranks got the same row"


# --- one node: slurm.sbatch, SIGUSR1, requeue, resume --------------------------------------

# SFT long enough (~10 steps/s here when the machine is idle) that the signal lands mid-stage
ONE_NODE = [*SMALL, "sft.max_steps=80", "sft.checkpoint_steps=5", "sft.per_device_train_batch_size=16",
            "align.max_steps=2", "align.per_device_train_batch_size=16", "run.reuse=false"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> Path:
    """The same run as a plain `posttrain`, never stopped."""
    once = tmp_path_factory.mktemp("once") / "run"
    argv, _ = posttrain_argv(*ONE_NODE, f"run.output_dir={once}", cache_dir=cache_dir)
    proc = subprocess.run(argv, env=job_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return once


# how Slurm's signal arrives: to the job's steps (the template's `--signal=USR1@120` before the
# time limit), or to the batch shell (`--signal=B:USR1`, a preemption's SIGTERM), which passes it on
SIGNALLED = {"steps": ["--signal=USR1"], "batch_shell": ["--batch", "--signal=USR1"]}


@pytest.mark.parametrize("signalled", SIGNALLED)
def test_a_job_signalled_mid_sft_is_requeued_and_ends_with_the_uninterrupted_weights(
    signalled, uninterrupted, tmp_path, cache_dir, jobs
):
    run, log = tmp_path / "run", tmp_path / "job.out"
    options = ["--nodes=1", "--cpus-per-task=1", "--time=20", f"--output={log}", f"--chdir={tmp_path}"]
    job = sbatch(REPO / "launch" / "slurm.sbatch", options, [*ONE_NODE, f"run.output_dir={run}"],
                 job_env(cache_dir), jobs)  # fmt: skip
    wait_for_checkpoint(run / "sft", job, log)
    subprocess.run(["scancel", *SIGNALLED[signalled], job], check=True)
    info = wait_for_job(job, log)

    output = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    assert f"requeueing job {job}" in output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["stages"]["sft"]["status"] == "resumed", "the requeued job resumed SFT from its checkpoint"
    assert f"resuming {run / 'sft' / 'checkpoints'}/checkpoint-" in output
    for stage in ("sft", "align"):
        worst = _max_difference(run / stage, uninterrupted / stage)
        assert worst <= TOLERANCE, f"{stage}: the requeued job's weights differ by {worst:.2e}"


# --- two nodes: slurm_multinode.sbatch, one torchrun or deepspeed per node, SFT -> DPO -------

# one process per node, micro-batch 8 each: 16 rows per optimizer step across the two nodes
TWO_NODES = [*SMALL, "launcher.gpus=1", "sft.max_steps=48", "sft.checkpoint_steps=4",
             "sft.per_device_train_batch_size=8", "align.max_steps=3", "align.per_device_train_batch_size=8",
             "run.rank_logs=true", "run.reuse=false"]  # fmt: skip


# 320 SFT rows and 160 pairs (SMALL), 16 a step
STEPS_PER_EPOCH = {"sft": 20, "align": 10}
# LAUNCHER (the template's choice) and the posttrain overrides of each way to span the nodes
SPANS = {
    "torchrun_ddp": ("torchrun", []),
    # srun starts `deepspeed --no_ssh --node_rank=<node>` on each node: no ssh, one process group
    "deepspeed_zero2": ("deepspeed", ["deepspeed=zero2"]),
}


@pytest.mark.parametrize("span", SPANS)
def test_a_two_node_job_preempted_once_is_requeued_and_completes_with_the_ranks_on_both_nodes(
    span, tmp_path, cache_dir, jobs
):
    launcher, extra = SPANS[span]
    run, log = tmp_path / "run", tmp_path / "job.out"
    options = ["--nodes=2", "--cpus-per-task=1", "--time=20", f"--output={log}", f"--chdir={tmp_path}"]
    # the template's port 29500 may be taken on a shared machine: a free one (overrides come last)
    overrides = [*TWO_NODES, *extra, f"launcher.master_port={free_port()}"]
    env = job_env(cache_dir, RUN_DIR=str(run), LAUNCHER=launcher)
    job = sbatch(REPO / "launch" / "slurm_multinode.sbatch", options, overrides, env, jobs)
    wait_for_checkpoint(run / "sft", job, log)
    # what `#SBATCH --signal=B:USR1@300` does before the time limit: SIGUSR1 to the batch shell
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = wait_for_job(job, log)

    output = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-4000:]
    assert f"requeueing job {job}" in output
    assert f"launch: {launcher} (srun on every node), 2 node(s) x 1 process(es) = 2" in output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["stages"]["sft"]["status"] == "resumed"
    for stage in ("sft", "align"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["world_size"] == 2
        assert_two_nodes_split_the_rows(run / stage, STEPS_PER_EPOCH[stage])
    if launcher == "deepspeed":
        hostfile = (tmp_path / f"slurm-{job}.hostfile").read_text().splitlines()
        assert [line.split()[0] for line in hostfile] == list(NODES), "the allocation's nodes"
        assert "--no_ssh --node_rank=@NODE_RANK@" in (run / "launch" / "workers.sh").read_text()
        ds = json.loads((run / "launch" / "deepspeed-sft.json").read_text())
        assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 16


# --- a sweep: one Slurm job per point through hydra-submitit -------------------------------

SWEEP = [*SMALL, "sft.max_steps=6", "sft.per_device_train_batch_size=16", "align.max_steps=2",
         "align.per_device_train_batch_size=16"]  # fmt: skip
SLURM_LAUNCHER = [
    "hydra/launcher=posttrain_slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.timeout_min=20",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.mem_gb=1",
]


def test_a_sweep_on_slurm_runs_each_point_as_a_job_sharing_one_sft_and_writes_its_report(tmp_path, cache_dir):
    out = tmp_path / "sweep"
    argv, _ = posttrain_argv("-m", *SLURM_LAUNCHER, *SWEEP, "align.beta=0.05,0.1", f"run.output_dir={out}",
                             cache_dir=tmp_path / "cache")  # fmt: skip
    proc = subprocess.run(argv, env=job_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # submitit submits one job array, a task per point: <job>_0 and <job>_1, each with its result
    tasks = sorted(p.parent.name for p in (out / ".submitit").glob("*/*_result.pkl"))
    assert len(tasks) == 2 and {t.rsplit("_", 1)[1] for t in tasks} == {"0", "1"}, tasks
    logs = "".join(p.read_text() for p in (out / ".submitit").glob("*/*_log.out"))
    assert logs.count("stage sft (sft) starting from base") == 1, "one SFT trained"
    assert logs.count("stage sft (sft): reusing complete artifact") == 1
    statuses = sorted(json.loads((out / p / "summary.json").read_text())["stages"]["sft"]["status"] for p in "01")
    assert statuses == ["reused", "trained"]
    for point, beta in zip("01", (0.05, 0.1), strict=True):
        manifest = json.loads((out / point / "align" / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["config"]["beta"] == beta
    table = (out / "sweep.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 3 and "best: run " in table
