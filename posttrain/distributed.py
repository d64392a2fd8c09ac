"""Processes training together: who is rank 0, and how they agree.

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


def log(message: str) -> None:
    """A progress line, printed once: by rank 0."""
    if is_main():
        print(f"[posttrain] {message}", flush=True)


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
    if cfg.deepspeed.stage is not None and not cuda:
        barrier()  # every rank has mapped the others' all-reduce buffers
        unlink_shm_buffer()


def unlink_shm_buffer() -> None:
    """Remove this rank's all-reduce buffer from /dev/shm once every rank has mapped it.
    DeepSpeed's CPU backend creates it at `init_distributed` and never removes it: 64 MiB a rank
    a run, left in the host's memory. Unlinked, the mappings stay valid and the memory is freed
    when the processes end, a crash included."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}").unlink(missing_ok=True)


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


# --- per-rank logs ---------------------------------------------------------------------


def memory_mark() -> int:
    """This process's resident memory now, in bytes, and its peak reset to it (Linux; 0 elsewhere):
    taken before a stage's model loads, it is the baseline the rank log's memory record reports from."""
    status = _proc_status()
    _reset_peak()
    return status.get("VmRSS", 0)


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak resident memory since the last reset) of this process, in bytes."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # not Linux
        return {}
    fields = (line.split() for line in lines if line.startswith(("VmRSS:", "VmHWM:")))
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in fields}  # kB


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (`echo 5 > /proc/self/clear_refs`) and torch's CUDA peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict[str, int | None]:
    import torch

    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"peak_rss": _proc_status().get("VmHWM", 0), "cuda_peak_allocated": cuda}


def rank_logger(trainer, folder, rss_before_model: int | None = None) -> None:
    """Make `trainer` append, on this rank, one line per training batch (a digest of each row's
    tokens, and the node: Slurm's node name, else the host name), one per log (the losses it
    logged) and, at the end of training, one memory record to `<folder>/ranks/rank-<N>.jsonl`:
    the resident memory before the model loaded (`rss_before_model`, from memory_mark), the peak
    RSS (and CUDA peak) while the model loaded, and the peak during train() (DeepSpeed's or DDP's
    set-up, every step), in bytes."""
    import hashlib
    import json
    import socket

    from transformers import TrainerCallback

    path = folder / "ranks" / f"rank-{rank()}.jsonl"
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
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
        write({"step": trainer.state.global_step + 1, "rows": rows, "node": node})

    class LoggedLosses(TrainerCallback):
        loading: dict[str, int | None] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.loading = _peaks()  # since memory_mark: the model's load
            _reset_peak()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                write({"step": state.global_step, "loss": logs["loss"]})

        def on_train_end(self, args, state, control, **kwargs):
            loading = {f"{k}_loading": v for k, v in self.loading.items()}
            training = {f"{k}_training": v for k, v in _peaks().items()}
            write({"step": state.global_step, "memory": {"rss_before_model": rss_before_model, **loading, **training}})

    trainer.model.register_forward_pre_hook(on_forward, with_kwargs=True)
    trainer.add_callback(LoggedLosses())
