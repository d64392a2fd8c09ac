"""Processes training together: who is rank 0, how they agree, and the DeepSpeed json.

Every worker runs the same pipeline on the same frozen config. Rank 0 alone writes run-folder
files (manifests, final models, reports, summary) and takes the file locks; it decides what a
stage does (reuse, resume, train) and the other ranks take its word through `agree`. Small
Python objects travel over a gloo group of their own, so the same code coordinates CPU (gloo)
and GPU (NCCL) runs, and waiting ranks can outlast a long evaluation on rank 0.

    init_workers(cfg)            # in each worker, before any model is loaded
    with main_first(): ...       # rank 0 fills a cache, then the others read it
    placement = agree(placement) # every rank gets rank 0's value
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import ConfigError, DeepSpeedConfig, LauncherConfig, StageConfig, require
from posttrain.memory import plan_memory_lines

if TYPE_CHECKING:
    from posttrain.config import Config

# how long ranks wait for rank 0 (an evaluation of a large model, a slow save)
WAIT = datetime.timedelta(hours=4)
_coordination = None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes training together (set by torchrun and the deepspeed launcher; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def distributed() -> bool:
    return world_size() > 1


def init_workers(cfg: Config) -> None:
    """Join the process group (gloo on CPU, NCCL on GPUs) before any model is loaded: ZeRO-3
    partitions the weights while `from_pretrained` reads them, which needs the group."""
    import torch
    import torch.distributed as dist

    global _coordination
    if dist.is_initialized() or (not distributed() and cfg.deepspeed.stage is None):
        return
    if not distributed():  # DeepSpeed in one process still wants a process group of one
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if cfg.deepspeed.stage is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=WAIT)
    else:
        dist.init_process_group(backend, timeout=WAIT)
    _coordination = dist.new_group(backend="gloo", timeout=WAIT)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if _coordination is not None:
        import torch.distributed as dist

        dist.barrier(group=_coordination)


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (a placement, metrics, a flag)."""
    if _coordination is None:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_coordination)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop signal that reached one node)."""
    if _coordination is None:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_coordination)
    return bool(value.item())


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (building a model, filling a cache), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shutdown() -> None:
    import torch.distributed as dist

    global _coordination
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _coordination = None


# --- batch arithmetic --------------------------------------------------------------------


def processes_per_node(launcher: LauncherConfig) -> int:
    """Processes the launcher starts on each node: launcher.gpus, else every visible GPU (1 without any)."""
    if launcher.name == "local":
        return 1
    return launcher.gpus or visible_gpus()


def planned_world_size(launcher: LauncherConfig) -> int:
    """Processes the launcher will start: nodes x processes per node."""
    return launcher.nnodes * processes_per_node(launcher)


def visible_gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def resolve_batches(stages: dict[str, StageConfig], world: int) -> None:
    """Derive gradient_accumulation_steps of every stage that sets global_batch_size."""
    for name, stage in stages.items():
        if stage.global_batch_size is None:
            continue
        per_step = stage.per_device_train_batch_size * world
        require(
            stage.global_batch_size % per_step == 0,
            f"{name}.global_batch_size",
            f"{stage.global_batch_size} is not divisible by per_device_train_batch_size "
            f"{stage.per_device_train_batch_size} x {world} processes = {per_step}; choose a multiple of {per_step} "
            f"or change {name}.per_device_train_batch_size",
        )
        stage.gradient_accumulation_steps = stage.global_batch_size // per_step


def global_batch(stage: StageConfig, world: int) -> int:
    return stage.per_device_train_batch_size * stage.gradient_accumulation_steps * world


def check_distributed(cfg: Config) -> None:
    """Mistakes that would only crash on the cluster, found where the config is composed (the
    checks of the chain and of each section ran already)."""
    ds, launcher = cfg.deepspeed, cfg.launcher
    from posttrain.config import stage_peft

    if ds.stage == 3:
        for name, stage in cfg.stages.items():
            peft = stage_peft(stage, cfg.peft)
            require(
                peft == "none",
                f"{name}.peft" if stage.peft else "peft.method",
                f"{peft} under deepspeed.stage=3 is not supported: ZeRO-3 partitions the base weights that "
                "4-bit loading and the LoRA merge need; use deepspeed=zero2 (or zero2_offload) for LoRA stages",
            )
    if launcher.name == "deepspeed" and launcher.hostfile:
        path = Path(launcher.hostfile).expanduser()
        require(path.is_file(), "launcher.hostfile", f"{path} does not exist")
        from posttrain.launch import read_hostfile

        hosts = read_hostfile(path)
        require(bool(hosts), "launcher.hostfile", f"{launcher.hostfile} names no host (lines: `host slots=N`)")
        require(
            launcher.nnodes <= len(hosts),
            "launcher.nnodes",
            f"{launcher.nnodes} nodes but the hostfile {launcher.hostfile} names {len(hosts)}",
        )
        if launcher.gpus is not None:
            short = [h for h, slots in hosts[: launcher.nnodes] if slots < launcher.gpus]
            require(
                not short,
                "launcher.gpus",
                f"{launcher.gpus} processes per node but {', '.join(short)} has fewer slots in {launcher.hostfile}",
            )
    if launcher.name != "local" and launcher.nnodes == 1 and not launcher.srun and launcher.gpus:
        import torch

        visible = torch.cuda.device_count()  # 0: CPU workers over gloo, any number
        require(
            not visible or launcher.gpus <= visible,
            "launcher.gpus",
            f"{launcher.gpus} processes but this node has {visible} GPUs; set launcher.gpus={visible} or fewer",
        )
    if launcher.name == "accelerate" and launcher.nnodes > 1:
        require(
            launcher.node_rank is not None or launcher.srun,
            "launcher.node_rank",
            "accelerate on several nodes needs this node's rank (or launcher.srun=true under Slurm)",
        )


# --- DeepSpeed's json --------------------------------------------------------------------


def precision(args: dict[str, Any]) -> str:
    """bf16, fp16 or fp32: how a stage's training arguments run (DeepSpeed's json must agree)."""
    return "bf16" if args["bf16"] else "fp16" if args["fp16"] else "fp32"


def deepspeed_json(
    ds: DeepSpeedConfig, stage: StageConfig, world: int, precision: str, hidden_size: int | None = None
) -> dict[str, Any]:
    """DeepSpeed's config for one stage, every value the training arguments also set written out
    (DeepSpeed's and the trainer's batch sizes, clipping and precision cannot disagree).

    `precision`: bf16, fp16 or fp32, as the trainer runs; `hidden_size` sizes the buckets (as
    transformers' "auto" would; left "auto" when unknown). With optimizer offload DeepSpeed's own
    CPU Adam takes the stage's learning rate and weight decay (offloading a torch optimizer is
    what DeepSpeed refuses); otherwise the trainer's AdamW and scheduler run as without DeepSpeed.
    """
    if ds.stage is None:
        raise ConfigError("deepspeed.stage: null has no DeepSpeed config")
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size or (hidden_size**2 if hidden_size else "auto"),
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        # the final model is saved whole, in plain Hugging Face format, not as ZeRO shards
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size**2) if hidden_size else "auto"
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size if hidden_size else "auto"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.per_device_train_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "train_batch_size": global_batch(stage, world),
        "gradient_clipping": stage.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own prints would repeat it
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": stage.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": stage.weight_decay,
            },
        }
    return _merged(config, ds.extra)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- the plan ------------------------------------------------------------------------


def plan_lines(cfg: Config) -> list[str]:
    """The launch, DeepSpeed and memory lines of `posttrain plan=true`."""
    launcher, ds = cfg.launcher, cfg.deepspeed
    world = planned_world_size(launcher)
    per_node = processes_per_node(launcher)
    how = " (srun on every node)" if launcher.srun else ""
    lines = [f"launch: {launcher.name}{how}, {launcher.nnodes} node(s) x {per_node} process(es) = {world}"]
    if ds.stage is None:
        lines.append("deepspeed: none" + (" (DDP: every process holds the whole model)" if world > 1 else ""))
    else:
        offload = [name for name, on in (("optimizer", ds.offload_optimizer), ("parameters", ds.offload_param)) if on]
        lines.append(f"deepspeed: ZeRO-{ds.stage}" + (f", {' and '.join(offload)} offloaded to CPU" if offload else ""))
    return lines + plan_memory_lines(cfg, world, per_node)


# --- per-rank logs ---------------------------------------------------------------------


def rank_logger(trainer, folder) -> None:
    """Make `trainer` append, on this rank, one line per training batch (a digest of each row's
    tokens) and one per log (the losses it logged) to `<folder>/ranks/rank-<N>.jsonl`."""
    import hashlib
    import json

    from transformers import TrainerCallback

    path = folder / "ranks" / f"rank-{rank()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_forward(module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not module.training or ids is None:
            return  # evaluation, reference log-probs
        mask = kwargs.get("attention_mask")
        rows = []
        for i, row in enumerate(ids.tolist()):
            kept = row if mask is None else [t for t, m in zip(row, mask[i].tolist(), strict=True) if m]
            rows.append(hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16])
        # the optimizer step this batch counts toward (train() replaces trainer.state)
        write({"step": trainer.state.global_step + 1, "rows": rows})

    class LoggedLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                write({"step": state.global_step, "loss": logs["loss"]})

    trainer.model.register_forward_pre_hook(on_forward, with_kwargs=True)
    trainer.add_callback(LoggedLosses())
