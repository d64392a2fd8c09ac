"""Start the workers of a run from its frozen config.

The head process (`posttrain ...`) composes the config once, writes `resolved.yaml` into the
run folder, and starts the launcher named by `launcher=`; every worker it starts runs
`python -m posttrain.worker <run folder>/resolved.yaml`, which reads that file and never runs
Hydra, so all ranks share one config and one run folder.

    command = launch_command(cfg, resolved)   # the torchrun / deepspeed / accelerate line
    exit_code = run_workers(cfg, resolved)    # run it here, forwarding stop signals
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.config import ConfigError, LauncherConfig, planned_world_size, processes_per_node
from posttrain.deepspeed_config import deepspeed_json, precision
from posttrain.distributed import free_port
from posttrain.stages import STAGES
from posttrain.stages.base import training_args

if TYPE_CHECKING:
    from posttrain.config import Config

WORKER = "posttrain.worker"
# torchrun, quiet when the workers exit 75 (posttrain/torchrun.py; a console script of posttrain's)
TORCHRUN = "posttrain-torchrun"
# placeholder for the node's rank in a command srun starts on every node (Slurm's SLURM_NODEID)
NODE_RANK = "@NODE_RANK@"
# `bash -c` script that runs its arguments with SIGUSR1 ignored (inherited until a worker sets its
# handler) and the node's rank put in for NODE_RANK
ON_EACH_NODE = f'trap "" USR1; exec "${{@//{NODE_RANK}/$SLURM_NODEID}}"'


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed/MPI hostfile (`worker-1 slots=8`; # comments)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"launcher.hostfile: {path} is not a text file of `host slots=N` lines") from None
    hosts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        slots = [r.split("=", 1)[1] for r in rest if r.startswith("slots=")]
        if len(rest) != len(slots) or len(slots) > 1 or (slots and not slots[0].isdigit()):
            raise ConfigError(f"launcher.hostfile: {path} line {number}: {line!r} is not `host slots=N`")
        hosts.append((host, int(slots[0]) if slots else 1))
    return hosts


def _port(launcher: LauncherConfig) -> int:
    """The rank-0 node's port: the configured one, else 29500 across nodes, else a free one here."""
    if launcher.master_port is not None:
        return launcher.master_port
    return 29500 if launcher.nnodes > 1 else free_port()


def launch_command(cfg: Config, resolved: Path) -> list[str]:
    """The command that starts every worker of the run on this node (or, with srun, on every node)."""
    launcher = cfg.launcher
    worker = [WORKER, str(resolved)]
    gpus, nodes = processes_per_node(launcher), launcher.nnodes
    rdzv_id = launcher.rdzv_id or cfg.run.name
    if launcher.name == "torchrun":
        cmd = [TORCHRUN, f"--nproc-per-node={gpus}", f"--nnodes={nodes}"]
        if nodes == 1 and launcher.master_port is None:
            cmd += ["--standalone"]  # a free local port
        elif launcher.node_rank is not None or nodes == 1:  # static: every node names its rank
            cmd += [
                f"--node-rank={launcher.node_rank or 0}",
                f"--master-addr={launcher.master_addr or '127.0.0.1'}",
                f"--master-port={_port(launcher)}",
            ]
        else:  # elastic rendezvous: ranks are assigned as the nodes arrive
            cmd += [
                f"--rdzv-backend={launcher.rdzv_backend}",
                f"--rdzv-endpoint={launcher.master_addr}:{_port(launcher)}",
                f"--rdzv-id={rdzv_id}",
            ]
        cmd += [*launcher.extra_args, "--module", *worker]
    elif launcher.name == "deepspeed":
        cmd = ["deepspeed"]
        if launcher.hostfile:
            cmd += [f"--hostfile={Path(launcher.hostfile).expanduser()}", f"--num_nodes={nodes}"]
        if launcher.srun:  # srun starts DeepSpeed on every node: no ssh, each node names its rank
            cmd += ["--no_ssh", f"--node_rank={NODE_RANK}"]
        master_addr = launcher.master_addr
        if master_addr is None and launcher.srun and launcher.hostfile:  # DeepSpeed would ask it over ssh
            master_addr = read_hostfile(Path(launcher.hostfile).expanduser())[0][0]
        if master_addr or not launcher.hostfile:  # else DeepSpeed takes the hostfile's first host
            cmd += [f"--master_addr={master_addr or '127.0.0.1'}"]
        cmd += [
            f"--num_gpus={gpus}",
            f"--master_port={_port(launcher)}",
            "--no_local_rank",  # workers read LOCAL_RANK from the environment
            *launcher.extra_args,
            "--module",
            *worker,
        ]
    elif launcher.name == "accelerate":
        config = resolved.parent / "launch" / "accelerate.yaml"
        cmd = ["accelerate", "launch", f"--config_file={config}"]
        if launcher.node_rank is not None or launcher.srun:
            cmd += [f"--machine_rank={NODE_RANK if launcher.srun else launcher.node_rank}"]
        cmd += [*launcher.extra_args, "--module", *worker]
    else:
        cmd = [sys.executable, "-m", *worker]
    if launcher.srun:
        # one launcher per node; it ignores the SIGUSR1 that posttrain sends on a stop request (srun
        # forwards it to every task) so that only the workers act on it: checkpoint, exit 75
        srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
        cmd = [*srun, "bash", "-c", ON_EACH_NODE, "posttrain-launcher", *cmd]
    return cmd


def accelerate_yaml(cfg: Config, deepspeed_json: Path | None) -> str:
    """accelerate's config for `accelerate launch`: DeepSpeed with posttrain's json, else multi-GPU DDP.
    (accelerate's MULTI_CPU wants mpirun; on CPU its DeepSpeed type runs the workers.)"""
    launcher = cfg.launcher
    lines = [
        "# written by posttrain from the run's resolved.yaml; used by `accelerate launch`",
        "compute_environment: LOCAL_MACHINE",
        f"num_machines: {launcher.nnodes}",
        f"num_processes: {planned_world_size(launcher)}",
        f"machine_rank: {launcher.node_rank or 0}",
        f"main_process_ip: {launcher.master_addr or '127.0.0.1'}",
        f"main_process_port: {_port(launcher)}",
        "rdzv_backend: static",
        "same_network: true",
        "use_cpu: false",
    ]
    if deepspeed_json is not None:
        lines += [
            "distributed_type: DEEPSPEED",
            "deepspeed_config:",
            f"  deepspeed_config_file: {deepspeed_json}",
            "  deepspeed_multinode_launcher: standard",
        ]
    else:
        lines += ["distributed_type: MULTI_GPU", "mixed_precision: 'no'"]
    return "\n".join(lines) + "\n"


def write_launch_files(cfg: Config, resolved: Path) -> list[str]:
    """The launcher's own files in `<run>/launch/` and the command, written there as a script
    a person can re-run (`bash <run>/launch/workers.sh`)."""
    import json

    folder = resolved.parent / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.launcher.name == "accelerate":
        ds_path = None
        if cfg.deepspeed.stage is not None:
            # accelerate checks the file's batch sizes against the first stage's; each stage's
            # trainer passes its own json (posttrain/stage_run.py)
            first = next(iter(cfg.stages.values()))
            ds_path = folder / "deepspeed.json"
            args = training_args(STAGES[first.method], first, cfg, resolved.parent / next(iter(cfg.stages)))
            ds = deepspeed_json(cfg.deepspeed, first, planned_world_size(cfg.launcher), precision(args))
            ds_path.write_text(json.dumps(ds, indent=2) + "\n")
        (folder / "accelerate.yaml").write_text(accelerate_yaml(cfg, ds_path))
    command = launch_command(cfg, resolved)
    script = folder / "workers.sh"
    script.write_text(f"#!/bin/bash\n# the command posttrain ran to start this run's workers\n{shlex.join(command)}\n")
    return command


def worker_env(cfg: Config) -> dict[str, str]:
    """The environment of the launcher: DeepSpeed's CPU accelerator where there is no GPU."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # one thread pool per worker: two workers sharing the cores each take all of them otherwise
        per_worker = max(1, (os.cpu_count() or 1) // processes_per_node(cfg.launcher))
        env.setdefault("OMP_NUM_THREADS", str(per_worker))
    return env


def stop_file(run_folder: Path) -> Path:
    """Written by the head process when it is asked to stop; every rank checks it after each step."""
    return run_folder / "launch" / "stop"


def run_workers(cfg: Config, resolved: Path) -> int:
    """Run the launcher and wait; SIGTERM/SIGUSR1 reach every worker (they checkpoint and exit 75)."""
    command = write_launch_files(cfg, resolved)
    stop = stop_file(resolved.parent)
    print(f"[posttrain] starting workers: {shlex.join(command)}", flush=True)
    try:
        process = subprocess.Popen(
            command, env=worker_env(cfg), start_new_session=True, preexec_fn=_launcher_ignores_usr1
        )
    except FileNotFoundError:
        missing = f"launcher.name: {command[0]!r} is not on PATH; install it or choose another launcher"
        raise ConfigError(missing) from None

    def forward(signum, frame) -> None:
        if signum != signal.SIGINT:
            # every worker, on every node, sees the stop file after its step; the SIGUSR1 reaches the
            # workers in the launcher's process group at once (the launchers ignore it: they would
            # end their workers on SIGTERM)
            stop.write_text(f"{signal.Signals(signum).name} to the posttrain head process\n")
        with contextlib.suppress(ProcessLookupError):  # the launcher has just exited
            os.killpg(process.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGUSR1)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launcher_ignores_usr1() -> None:
    """In the launcher's process: ignore SIGUSR1 (inherited by its children until a worker sets
    its own handler, posttrain/preemption.py), so Slurm's warning signal stops only the workers."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
