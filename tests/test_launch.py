"""Starting workers: the launcher command lines for a 4-node x 8-GPU job (posttrain/launch.py), and
the launch/ scripts: valid bash, the Slurm templates requeue exactly when posttrain was preempted."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from posttrain.cli import compose_tree
from posttrain.config import ConfigError
from posttrain.launch import launch_command, write_launch_files
from posttrain.plan import load_config
from posttrain.preemption import EXIT_PREEMPTED
from tests.conftest import REPO

HOSTFILE = REPO / "launch" / "hostfile.example"


def config(*overrides: str, tmp_path: Path | None = None):
    run = [f"run.output_dir={tmp_path / 'run'}"] if tmp_path else []
    return load_config(compose_tree([*run, *overrides]))


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


def _bash_ok(command: list[str], tmp_path: Path) -> None:
    script = tmp_path / "command.sh"
    script.write_text(shlex.join(command) + "\n")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def _cluster_tools(bin_dir: Path) -> None:
    """scontrol names four hosts; srun records the command it was given and succeeds."""
    bin_dir.mkdir()
    tools = {
        "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-01\\ngpu-02\\ngpu-03\\ngpu-04\\n"; '
        'else echo "scontrol $*" >> "$CALLS"; fi',
        "srun": 'printf "%s\\n" "$@" > "$SRUN_ARGS"',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


def test_a_hostfile_line_that_is_not_host_slots_names_its_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode-0 slots=8\nnode-1 gpus=8\n")
    with pytest.raises(ConfigError, match=r"hostfile line 3: 'node-1 gpus=8' is not `host slots=N`"):
        config("launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.nnodes=2")


def test_deepspeed_command_for_four_nodes_of_eight_gpus(tmp_path):
    cfg = config(
        "deepspeed=zero3", "launcher=deepspeed", "launcher.gpus=8", "launcher.nnodes=4",
        f"launcher.hostfile={HOSTFILE}", tmp_path=tmp_path,
    )  # fmt: skip
    resolved = tmp_path / "run" / "resolved.yaml"
    command = launch_command(cfg, resolved)
    assert command == [
        "deepspeed", f"--hostfile={HOSTFILE}", "--num_nodes=4", "--num_gpus=8", "--master_port=29500",
        "--no_local_rank", "--module", "posttrain.worker", str(resolved),
    ]  # fmt: skip
    _bash_ok(command, tmp_path)


def test_deepspeed_under_srun_starts_on_every_node_without_ssh(tmp_path):
    cfg = config(
        "deepspeed=zero3", "launcher=deepspeed", "launcher.gpus=8", "launcher.nnodes=4",
        f"launcher.hostfile={HOSTFILE}", "launcher.srun=true", tmp_path=tmp_path,
    )  # fmt: skip
    resolved = tmp_path / "run" / "resolved.yaml"
    command = launch_command(cfg, resolved)
    assert command[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # each node's deepspeed names its own rank (srun's SLURM_NODEID) and the hostfile's first host
    assert command[command.index("deepspeed") :] == [
        "deepspeed", f"--hostfile={HOSTFILE}", "--num_nodes=4", "--no_ssh", "--node_rank=@NODE_RANK@",
        "--master_addr=node-0", "--num_gpus=8", "--master_port=29500", "--no_local_rank", "--module",
        "posttrain.worker", str(resolved),
    ]  # fmt: skip
    _bash_ok(command, tmp_path)


def test_torchrun_commands_for_four_nodes_of_eight_gpus(tmp_path):
    common = ["launcher=torchrun", "launcher.gpus=8", "launcher.nnodes=4", "launcher.master_addr=node-0"]
    resolved = tmp_path / "run" / "resolved.yaml"
    elastic = launch_command(config(*common, "launcher.rdzv_id=job-7", tmp_path=tmp_path), resolved)
    assert elastic == [
        "posttrain-torchrun", "--nproc-per-node=8", "--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node-0:29500",
        "--rdzv-id=job-7", "--module", "posttrain.worker", str(resolved),
    ]  # fmt: skip
    static = launch_command(config(*common, "launcher.node_rank=2", tmp_path=tmp_path), resolved)
    assert static[3:6] == ["--node-rank=2", "--master-addr=node-0", "--master-port=29500"]
    under_slurm = launch_command(config(*common, "launcher.srun=true", tmp_path=tmp_path), resolved)
    assert under_slurm[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # the rendezvous id defaults to the run's name (the default recipe's)
    torchrun = under_slurm[under_slurm.index("posttrain-torchrun") :]
    assert torchrun == [*elastic[:5], "--rdzv-id=tiny_sft_dpo", *elastic[6:]]
    for command in (elastic, static, under_slurm):
        _bash_ok(command, tmp_path)


def test_accelerate_gets_a_config_file_with_posttrains_deepspeed_json(tmp_path):
    cfg = config(
        "deepspeed=zero2", "launcher=accelerate", "launcher.gpus=8", "launcher.nnodes=4",
        "launcher.master_addr=node-0", "launcher.node_rank=1", tmp_path=tmp_path,
    )  # fmt: skip
    resolved = tmp_path / "run" / "resolved.yaml"
    command = write_launch_files(cfg, resolved)
    folder = resolved.parent / "launch"
    assert command[:4] == ["accelerate", "launch", f"--config_file={folder / 'accelerate.yaml'}", "--machine_rank=1"]
    accelerate = yaml.safe_load((folder / "accelerate.yaml").read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED"
    assert (accelerate["num_machines"], accelerate["num_processes"], accelerate["main_process_ip"]) == (4, 32, "node-0")
    ds = yaml.safe_load(Path(accelerate["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["train_batch_size"] == cfg.stages["sft"].per_device_train_batch_size * 32
    assert subprocess.run(["bash", "-n", str(folder / "workers.sh")]).returncode == 0


def test_under_srun_each_node_puts_in_its_own_rank_and_ignores_sigusr1(tmp_path):
    cfg = config(
        "launcher=accelerate", "launcher.gpus=8", "launcher.nnodes=4", "launcher.master_addr=node-0",
        "launcher.srun=true", tmp_path=tmp_path,
    )  # fmt: skip
    command = launch_command(cfg, tmp_path / "run" / "resolved.yaml")
    wrapper = command[command.index("bash") : command.index("accelerate")]
    assert "--machine_rank=@NODE_RANK@" in command
    # what srun runs on node 3: the wrapper, here around `echo` and a `kill -USR1` of itself
    node = subprocess.run(
        [*wrapper, "bash", "-c", 'kill -USR1 $$; echo "$@"', "_", *command[command.index("accelerate") :]],
        env={**os.environ, "SLURM_NODEID": "3"}, capture_output=True, text=True,
    )  # fmt: skip
    assert node.returncode == 0, "SIGUSR1 is ignored"
    assert "--machine_rank=3" in node.stdout.split()


def test_the_multinode_slurm_template_starts_one_torchrun_per_node_on_one_frozen_config(tmp_path, cache_dir):
    """The real script and the real posttrain head, with Slurm's scontrol and srun stood in for."""
    script = REPO / "launch" / "slurm_multinode.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert script.read_text().splitlines()[1].startswith("# sbatch --nodes=4 launch/slurm_multinode.sbatch ")
    _cluster_tools(tmp_path / "bin")
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls.txt"),
        "SRUN_ARGS": str(tmp_path / "srun_args.txt"),
        "POSTTRAIN_CACHE": str(cache_dir),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "gpu-[01-04]",
        "SLURM_GPUS_ON_NODE": "8",
        "RUN_DIR": str(run_dir),
    }
    proc = subprocess.run(
        ["bash", str(script), "deepspeed=zero3"], env=env, capture_output=True, text=True, timeout=300
    )
    # the stand-in srun trains nothing, so the head finds no summary: it exits 0 with nothing to show
    assert proc.returncode == 0, proc.stderr[-3000:]
    srun = (tmp_path / "srun_args.txt").read_text().splitlines()
    resolved = run_dir / "resolved.yaml"
    torchrun = srun[srun.index("posttrain-torchrun") :]
    assert srun[:3] == ["--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert torchrun == [
        "posttrain-torchrun", "--nproc-per-node=8", "--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-01:29500",
        "--rdzv-id=4242", "--module", "posttrain.worker", str(resolved),
    ]  # fmt: skip
    frozen = yaml.safe_load(resolved.read_text())
    assert (frozen["launcher"]["nnodes"], frozen["launcher"]["gpus"], frozen["deepspeed"]["stage"]) == (4, 8, 3)
    assert frozen["run"]["output_dir"] == str(run_dir) and Path(frozen["run"]["cache_dir"]).is_absolute()
    assert "launch: torchrun (srun on every node), 4 node(s) x 8 process(es) = 32" in proc.stdout
    assert not (tmp_path / "calls.txt").exists(), "no requeue after a run that was not preempted"
