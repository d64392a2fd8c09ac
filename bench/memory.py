"""Model-state memory per rank: `posttrain plan=true`'s estimate beside the peak each worker measured.

    python bench/memory.py                              # 119M model, 2 CPU workers, 9 configs: ~17 min
    python bench/memory.py --configs ddp zero3 --steps 2

A random-init Llama of Qwen2.5-0.5B's layers (6 of them, a 32k vocabulary: 119M parameters) is
saved as a local folder and trained by `posttrain` itself (SFT only, `--steps` optimizer steps,
micro-batch `--batch` of at most `--seq` tokens) with 2 CPU workers under each configuration:
DDP (torchrun), ZeRO-1/2/3, ZeRO-2 with optimizer offload, ZeRO-3 with optimizer and parameter
offload (deepspeed launcher), and LoRA under DDP, ZeRO-2 and ZeRO-3. Every worker writes its memory to
its rank log (`run.rank_logs=true`): its RSS just before the model loads (the baseline: Python,
torch, DeepSpeed, the tokenizer and data), the peak while it loads, and the peak during
train() (DeepSpeed's or DDP's set-up and every step). Measured = peak during training -
baseline: model states, the activations of one micro-batch and allocator slack. The estimate is
the one `plan=true` prints for CPU workers with the same overrides (plan.model_state_estimate):
per process, plus, with offload, the CPU-per-node figure divided by the processes per node (on
CPU workers both live in the same RSS); `+ activations` adds memory.activation_bytes of one
micro-batch (doubled: fp32). Prints a table and appends to results/memory.jsonl. (On GPUs the
rank logs' cuda_peak_allocated would be the figure to compare; this script runs CPU workers.)

The workers run with MALLOC_MMAP_THRESHOLD_=65536 (`--glibc-default` leaves it): by default
glibc keeps freed heap memory (the loading's, DeepSpeed's set-up copies) for reuse, and RSS counts
it, so the peak says more about the allocator than about the model states (ZeRO-3 measured
2.5 GiB per rank that way, 1.8 GiB with every large block unmapped when freed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_model, report

MIB = 2**20
TWO = ["launcher.gpus=2"]
CONFIGS = {
    "ddp": ["launcher=torchrun", *TWO],
    "zero1": ["deepspeed=zero1", "launcher=deepspeed", *TWO],
    "zero2": ["deepspeed=zero2", "launcher=deepspeed", *TWO],
    "zero3": ["deepspeed=zero3", "launcher=deepspeed", *TWO],
    "zero2_offload": ["deepspeed=zero2_offload", "launcher=deepspeed", *TWO],
    "zero3_offload": ["deepspeed=zero3_offload", "launcher=deepspeed", *TWO],
    "lora_ddp": ["peft=lora", "launcher=torchrun", *TWO],
    "lora_zero2": ["peft=lora", "deepspeed=zero2", "launcher=deepspeed", *TWO],
    "lora_zero3": ["peft=lora", "deepspeed=zero3", "launcher=deepspeed", *TWO],
}


def overrides(model_dir: Path, config: str, args) -> list[str]:
    return [
        f"model.path={model_dir}",
        "run.tuned_for=null",  # a speed benchmark keeps the default stage settings on this model
        "align=none",
        "data.builtin.num_sft=64",
        "data.builtin.num_test=8",
        f"sft.max_steps={args.steps}",
        f"sft.max_length={args.seq}",
        f"sft.per_device_train_batch_size={args.batch}",
        "sft.logging_steps=1",
        "sft.eval.num_prompts=0",
        "sft.eval.num_loss_rows=0",
        "run.rank_logs=true",
        "run.reuse=false",
        *CONFIGS[config],
    ]


def estimate(settings: list[str]) -> tuple[float, int]:
    """(bytes per rank on CPU workers, parameters) as `plan=true` estimates them for these overrides."""
    from posttrain.cli import compose_tree
    from posttrain.config import processes_per_node
    from posttrain.plan import load_config, model_state_estimate

    cfg = load_config(compose_tree(settings))
    found = model_state_estimate(cfg, on_gpu=False)
    offloaded = cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_param
    return found.per_gpu + (found.cpu_per_node / processes_per_node(cfg.launcher) if offloaded else 0), found.total


def measure(settings: list[str], out: Path, cache: Path, glibc_default: bool) -> tuple[list[dict], float]:
    """Each rank's memory record of the SFT stage, and the run's wall time."""
    start = time.perf_counter()
    env = {**os.environ, "POSTTRAIN_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if not glibc_default:  # every block over 64 KiB its own mapping, unmapped when freed
        env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    argv = [sys.executable, "-m", "posttrain.cli", *settings, f"run.output_dir={out}"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    records = []
    for rank in (0, 1):
        lines = (out / "sft" / "ranks" / f"rank-{rank}.jsonl").read_text().splitlines()
        records.append(next(json.loads(line)["memory"] for line in lines if '"memory"' in line))
    return records, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="qwen0.5b-6l", help="a bench/common.py size")
    parser.add_argument("--seq", type=int, default=128, help="sft.max_length")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per worker")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps")
    parser.add_argument(
        "--glibc-default", action="store_true", help="leave glibc's malloc as it is (it keeps freed heap memory)"
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()

    from posttrain import memory
    from posttrain.config import ArchitectureConfig

    header = ["config", "estimate", "+ activations", "measured rank 0", "rank 1", "off", "baseline", "load", "time"]
    table, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = build_model(args.size, folder, args.seq)
        arch = ArchitectureConfig.from_json(json.loads((model_dir / "config.json").read_text()))
        # what one micro-batch keeps for the backward; fp32 on a CPU: twice the 16-bit formula's
        activations = 2 * memory.activation_bytes(arch, args.batch, args.seq)
        for config in args.configs:
            settings = overrides(model_dir, config, args)
            estimated, total = estimate(settings)
            ranks, seconds = measure(settings, folder / config, folder / "cache", args.glibc_default)
            states = [r["peak_rss_training"] - r["rss_before_model"] for r in ranks]
            loading = max(r["peak_rss_loading"] - r["rss_before_model"] for r in ranks)
            off = (estimated + activations) / max(states) - 1
            table.append([
                config, memory.gib(estimated), memory.gib(estimated + activations), memory.gib(states[0]),
                memory.gib(states[1]), f"{100 * off:+.0f}%", memory.gib(max(r["rss_before_model"] for r in ranks)),
                memory.gib(loading), f"{seconds:.0f} s",
            ])  # fmt: skip
            records.append({"config": config, "estimate": round(estimated), "activations": round(activations),
                            "measured": states, "off": round(off, 3), "ranks": ranks, "seconds": round(seconds, 1),
                            "parameters": total, "size": args.size, "seq": args.seq, "batch": args.batch,
                            "steps": args.steps, "glibc_default": args.glibc_default})  # fmt: skip
            print(" | ".join(str(c) for c in table[-1]), flush=True)
    report("memory", header, table, records)
    print(
        f"{memory.count(total)} parameters, 2 CPU workers; estimate: plan=true's model states per rank (with "
        f"offload + CPU per node / 2); + activations: one micro-batch's ({args.batch} x {args.seq} tokens, fp32, "
        f"~{memory.gib(activations)}); measured: peak RSS during train() - RSS before the model loads (baseline); "
        "off: (estimate + activations) / the larger rank's - 1; load: peak RSS while the model loads - baseline"
    )


if __name__ == "__main__":
    main()
