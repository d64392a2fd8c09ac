"""The `deepspeed` section (conf/deepspeed/: ZeRO stage and offload) and the `launcher` section
(conf/launcher/: how many processes on how many nodes, and who starts them), with the process
counts the plan and the batch arithmetic use.

    posttrain deepspeed=zero3 launcher=deepspeed launcher.gpus=8 launcher.nnodes=4 launcher.hostfile=hosts
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import require

ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings; posttrain writes DeepSpeed's json from them and each stage's
    training arguments (posttrain/distributed.py), so batch sizes and precision never disagree."""

    # ZeRO stage 0-3; null: no DeepSpeed (plain PyTorch, DDP across processes)
    stage: int | None = None
    # keep the optimizer states (and step) in CPU memory (ZeRO 1-3)
    offload_optimizer: bool = False
    # keep the parameters in CPU memory too (ZeRO-3 only)
    offload_param: bool = False
    # overlap gradient reduction with the backward pass
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    # elements per reduction bucket; null: hidden_size^2, filled from the model
    reduce_bucket_size: int | None = None
    # any other DeepSpeed json keys, merged last (e.g. {"zero_optimization": {"sub_group_size": 1e9}})
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import importlib.util

        stages = "null, " + ", ".join(map(str, ZERO_STAGES))
        require(self.stage in (None, *ZERO_STAGES), "deepspeed.stage", f"{self.stage!r} is not one of {stages}")
        if self.stage is None:
            return
        installed = importlib.util.find_spec("deepspeed") is not None
        require(installed, "deepspeed.stage", "deepspeed is not installed: pip install deepspeed")
        require(
            not self.offload_optimizer or self.stage >= 1,
            "deepspeed.offload_optimizer",
            f"needs ZeRO stage 1, 2 or 3 (deepspeed.stage is {self.stage})",
        )
        require(
            not self.offload_param or self.stage == 3,
            "deepspeed.offload_param",
            f"needs ZeRO stage 3 (deepspeed.stage is {self.stage}); use deepspeed=zero3_offload",
        )
        require(
            self.reduce_bucket_size is None or self.reduce_bucket_size > 0,
            "deepspeed.reduce_bucket_size",
            f"{self.reduce_bucket_size} must be > 0 or null",
        )


LAUNCHERS = ("local", "torchrun", "deepspeed", "accelerate")


@dataclass
class LauncherConfig:
    """How the workers start: one process here (local), or one per GPU on every node."""

    # local, torchrun, deepspeed, accelerate
    name: str = "local"
    # processes per node (one per GPU); null: every visible GPU (1 without a GPU)
    gpus: int | None = None
    nnodes: int = 1
    # this node's rank for torchrun/accelerate (null: torchrun's rendezvous assigns it)
    node_rank: int | None = None
    # address and port of the rank-0 node (address null: this node, or with a hostfile its first
    # host; port null: 29500 across nodes, a free one on one node)
    master_addr: str | None = None
    master_port: int | None = None
    # torchrun rendezvous backend and id (null: the run's name)
    rdzv_backend: str = "c10d"
    rdzv_id: str | int | None = None
    # deepspeed launcher: a hostfile of `host slots=N` lines (null: this node only)
    hostfile: str | None = None
    # start the launcher on every node of the Slurm allocation with `srun` (one task per node;
    # deepspeed then reaches no node over ssh: each node's runs with --no_ssh and its rank)
    srun: bool = False
    # extra arguments for the launcher command, before the worker module
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = ", ".join(LAUNCHERS)
        require(self.name in LAUNCHERS, "launcher.name", f"{self.name!r} is not one of {names}")
        require(self.gpus is None or self.gpus > 0, "launcher.gpus", f"{self.gpus} must be > 0 or null")
        require(self.nnodes > 0, "launcher.nnodes", f"{self.nnodes} must be > 0")
        if self.name == "local":
            require(self.nnodes == 1, "launcher.nnodes", "launcher=local runs one process; use torchrun or deepspeed")
            require(
                self.gpus in (None, 1), "launcher.gpus", "launcher=local runs one process; use torchrun or deepspeed"
            )
        if self.node_rank is not None:
            require(
                0 <= self.node_rank < self.nnodes,
                "launcher.node_rank",
                f"{self.node_rank} is not in [0, {self.nnodes})",
            )
        if self.nnodes > 1 and self.name in ("torchrun", "accelerate"):
            require(
                self.master_addr is not None,
                "launcher.master_addr",
                f"{self.name} on {self.nnodes} nodes needs the rank-0 node's address (every node must reach it)",
            )
        require(
            not self.srun or self.name != "local",
            "launcher.srun",
            "srun starts torchrun, deepspeed or accelerate on every node; local runs one process",
        )
        if self.name == "deepspeed" and self.nnodes > 1:
            require(
                self.hostfile is not None,
                "launcher.hostfile",
                f"the deepspeed launcher on {self.nnodes} nodes needs a hostfile (see launch/hostfile.example)",
            )
        if self.hostfile is not None:
            require(self.name == "deepspeed", "launcher.hostfile", "only the deepspeed launcher reads a hostfile")


# --- processes --------------------------------------------------------------------------


def processes_per_node(launcher: LauncherConfig) -> int:
    """Processes the launcher starts on each node: launcher.gpus, else every visible GPU (1 without any)."""
    if launcher.name == "local":
        return 1
    return launcher.gpus or visible_gpus()


def planned_world_size(launcher: LauncherConfig) -> int:
    """Processes the launcher will start: nodes x processes per node."""
    return launcher.nnodes * processes_per_node(launcher)


def gpu_devices_present() -> bool:
    """Whether this machine shows a GPU device (NVIDIA or AMD): when not, the checks that would
    ask torch (an import of seconds) already know the answer."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def visible_gpus() -> int:
    if not gpu_devices_present():
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)
