"""SFT tokens/s: posttrain's default stage vs TRL's SFTTrainer (tuned for the device, and its
defaults) vs a raw PyTorch loop.

    python bench/sft_throughput.py                          # 20M Llama, seq 512, CPU: ~6 min
    python bench/sft_throughput.py --size qwen0.5b --seq 2048 --batch 16   # a GPU
    python bench/sft_throughput.py --size llama3_2_1b --seq 4096 --batch 4 --runs posttrain,raw,trl_tuned
    python bench/sft_throughput.py --runs posttrain --set sft.compile=true  # one option, posttrain alone
    python bench/sft_throughput.py --model smollm2_135m --seq 128 --batch 8 --runs posttrain,raw,trl_tuned

Same random-init model (a local folder, loaded with from_pretrained; `--size` a registry name
builds that model's shape from conf/model/<name>.yaml; `--model` a registry model's real weights,
tokenizer and chat template), same variable-length conversations, one
process. posttrain: the `sft` stage exactly as `posttrain` builds it (composed config, training
args chosen for the device, TRL underneath; `--set` adds overrides). TRL tuned: SFTConfig as a
competent user sets it for the device (bf16 on a GPU with bf16 units, else fp32; flash
attention when flash-attn is installed, else sdpa; Liger when installed; no activation
checkpointing unless `--trl-checkpointing`). TRL defaults: SFTConfig with only output_dir,
batch size, max_length and the step count set. Raw loop: forward, backward, clip, AdamW on
posttrain's own batches, nothing else. Tokens are real (non-padding) tokens; the first
`--warmup` steps are not timed. Prints a table and appends to results/sft_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from common import SIZE_HELP, build_model, conversations, real_model, report, stage_trainer, trl_as_installed

RUNS = ("posttrain", "raw", "trl_tuned", "trl_default")

# dense bf16 peak by GPU name (MFU's denominator); CPUs are measured
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)
    a = torch.randn(2048, 2048)
    for _ in range(2):
        a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 2048**3 / (time.perf_counter() - t)


def flops_per_token(cfg, parameters: int, seq: float) -> float:
    """6N for the weights (the input embedding's lookup is no matmul) plus attention's
    12 * layers * hidden * context (forward and backward)."""
    params = parameters - cfg.vocab_size * cfg.hidden_size * (not cfg.tie_word_embeddings)
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def clock(warmup: int, budget: float):
    """A callback recording time and real tokens seen after the warm-up steps; it ends training
    once `budget` seconds were timed (a slow configuration still gives its rate)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        start = end = None
        tokens0 = tokens1 = 0

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if state.global_step == warmup:
                self.start, self.tokens0 = now, state.num_input_tokens_seen
            self.end, self.tokens1 = now, state.num_input_tokens_seen
            if self.start is not None and now - self.start > budget:
                control.should_training_stop = True

        def tokens_per_s(self) -> float:
            return (self.tokens1 - self.tokens0) / (self.end - self.start)

    return Clock()


def posttrain_trainer(model_dir: Path, rows, args, out: Path):
    """The `sft` stage as `posttrain` builds it, from the composed default config."""
    from posttrain.cli import compose_tree
    from posttrain.plan import load_config

    overrides = [
        *([f"model={args.model}"] if args.model else [f"model.path={model_dir}"]),
        "run.tuned_for=null",  # a speed benchmark keeps the default stage settings on this model
        "align=none",
        f"sft.max_length={args.seq}",
        f"sft.max_steps={args.steps + args.warmup}",
        f"sft.per_device_train_batch_size={args.batch}",
        *args.set,
        "sft.learning_rate=1e-4",
        "sft.logging_steps=1",
    ]
    cfg = load_config(compose_tree(overrides))
    extra = {"include_num_input_tokens_seen": "non_padding", "disable_tqdm": True}
    trainer = stage_trainer(cfg, "sft", model_dir, rows, out, extra)
    return trainer, cfg


def trl_default_trainer(model_dir: Path, rows, args, out: Path):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    trl_as_installed()
    config = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_length=args.seq,
        max_steps=args.steps + args.warmup, learning_rate=1e-4, use_cpu=not torch.cuda.is_available(),
        report_to="none", include_num_input_tokens_seen="non_padding", disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    return SFTTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(rows))


def trl_tuned_trainer(model_dir: Path, rows, args, out: Path):
    """TRL's SFTTrainer as a competent user sets it up on this device (see the module docstring)."""
    import importlib.util

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    trl_as_installed()
    config = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_length=args.seq,
        max_steps=args.steps + args.warmup, learning_rate=1e-4, use_cpu=not cuda, bf16=bf16,
        activation_checkpointing=args.trl_checkpointing, use_liger_kernel=liger,
        model_init_kwargs={"attn_implementation": attn, "dtype": torch.bfloat16 if bf16 else torch.float32},
        report_to="none", include_num_input_tokens_seen="non_padding", disable_tqdm=True, save_strategy="no",
        logging_steps=1,
    )  # fmt: skip
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(rows))
    return (
        trainer,
        f"{'bf16' if bf16 else 'fp32'} weights, {attn}, liger={liger}, checkpointing={args.trl_checkpointing}",
    )


def first_losses(trainer, n: int = 4) -> list[float]:
    return [round(r["loss"], 5) for r in trainer.state.log_history if "loss" in r][:n]


def peak_memory_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    import gc

    import torch

    gc.collect()  # the previous run's trainer, model and optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def raw_loop(model_dir: Path, batches: list, checkpointing: bool, args, cfg) -> float:
    """tokens/s of forward/backward/clip/AdamW on the batches posttrain's trainer would feed, in the
    precision posttrain picks (fp32 weights and bf16 autocast on a GPU with bf16 units; bf16
    weights and posttrain's bf16 AdamW under a bf16 `optimizer`), activation checkpointing as posttrain's."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain import models, optim
    from posttrain.stage_model import trained_dtype

    stage = cfg.stages["sft"]
    dtype, compute = trained_dtype(stage, cfg), models.compute_dtype(cfg.model.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=cfg.model.attn_implementation
    ).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    if stage.optimizer in optim.BF16_OPTIMIZERS:
        cls, kwargs = optim.optimizer_cls_and_kwargs(stage.optimizer, {"learning_rate": 1e-4})
        optimizer = cls(model.parameters(), **kwargs)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    batches = iter(batches)
    tokens, start = 0, None
    for step in range(args.steps + args.warmup):
        batch = {k: v.to(device) for k, v in next(batches).items() if k in ("input_ids", "attention_mask", "labels")}
        with torch.autocast(device, dtype=compute, enabled=compute != dtype):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step + 1 == args.warmup:
            start = time.perf_counter()
        elif step + 1 > args.warmup:
            tokens += int(batch["attention_mask"].sum())
            if time.perf_counter() - start > args.budget:
                break
    rate = tokens / (time.perf_counter() - start)
    del model, optimizer
    return rate


def profile_posttrain(trainer) -> None:
    """Top operators of posttrain's steps 3-4 (GPU: by CUDA time), to see where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=2))

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            prof.step()

    trainer.args.max_steps = 4
    trainer.add_callback(Step())
    with prof:
        trainer.train()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20m", help=SIZE_HELP)
    parser.add_argument("--model", help="a registry model's real weights instead of --size: smollm2_135m")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds timed per run at most")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which runs, comma-separated: {', '.join(RUNS)}")
    parser.add_argument("--trl-checkpointing", action="store_true", help="TRL tuned: activation checkpointing on")
    parser.add_argument("--profile", action="store_true", help="print the top operators of posttrain's steps")
    parser.add_argument("--set", action="append", default=[], help="a posttrain override: sft.group_by_length=true")
    args = parser.parse_args()
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown or "posttrain" not in runs and "raw" in runs:
        raise SystemExit(
            f"--runs: {', '.join(unknown) or 'raw'}: allowed {', '.join(RUNS)} (raw needs posttrain's batches)"
        )
    rows = conversations(args.batch * (args.steps + args.warmup) * 2, args.seq)
    results, losses, peaks, notes = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = real_model(args.model) if args.model else build_model(args.size, folder, args.seq)
        trainer, cfg = posttrain_trainer(model_dir, rows, args, folder / "posttrain")
        # the raw loop runs before and after posttrain (the mean counts): a machine that speeds up
        # or slows down during the benchmark favours neither
        raw_runs = []
        # the batches posttrain's trainer feeds, for the raw loop (taken before it trains, then freed)
        batches = list(itertools.islice(trainer.get_train_dataloader(), args.steps + args.warmup))
        checkpointing = bool(trainer.args.activation_checkpointing)
        if "raw" in runs:
            device = trainer.model.device
            trainer.model.to("cpu")  # the GPU holds one model at a time (an 8B model's states fill it)
            reset_peak()
            raw_runs.append(raw_loop(model_dir, batches, checkpointing, args, cfg))
            peaks["raw PyTorch loop"] = peak_memory_gib()
            print(f"[bench] raw PyTorch loop: {raw_runs[-1]:.0f} tokens/s", flush=True)
            trainer.model.to(device)
        name = f"posttrain {' '.join(args.set) or 'default'}"
        if "posttrain" in runs:
            reset_peak()
            clock_cb = clock(args.warmup, args.budget)
            trainer.add_callback(clock_cb)
            trainer.train()
            results[name], losses[name], peaks[name] = clock_cb.tokens_per_s(), first_losses(trainer), peak_memory_gib()
            notes[name] = (
                f"micro-batch {trainer.args.per_device_train_batch_size} x {trainer.args.gradient_accumulation_steps}, "
                f"checkpointing={trainer.args.activation_checkpointing}, optimizer={cfg.stages['sft'].optimizer}"
            )
            print(f"[bench] {name}: {results[name]:.0f} tokens/s, peak {peaks[name]} GiB, {notes[name]}", flush=True)
        config, parameters = trainer.model.config, sum(p.numel() for p in trainer.model.parameters())
        if args.profile:
            profile_posttrain(posttrain_trainer(model_dir, rows, args, folder / "profiled")[0])
        del trainer
        if "raw" in runs:
            reset_peak()
            raw_runs.append(raw_loop(model_dir, batches, checkpointing, args, cfg))
            results["raw PyTorch loop"] = sum(raw_runs) / len(raw_runs)
            print(f"[bench] raw PyTorch loop: {raw_runs[-1]:.0f} tokens/s", flush=True)
        if "trl_tuned" in runs:
            reset_peak()
            trl, notes["TRL tuned"] = trl_tuned_trainer(model_dir, rows, args, folder / "trl-tuned")
            clock_cb = clock(args.warmup, args.budget)
            trl.add_callback(clock_cb)
            trl.train()
            results["TRL tuned"], losses["TRL tuned"], peaks["TRL tuned"] = (
                clock_cb.tokens_per_s(), first_losses(trl), peak_memory_gib()
            )  # fmt: skip
            print(f"[bench] TRL tuned: {results['TRL tuned']:.0f} tokens/s, peak {peaks['TRL tuned']} GiB", flush=True)
            del trl
        if "trl_default" in runs:
            reset_peak()
            trl = trl_default_trainer(model_dir, rows, args, folder / "trl")
            # TRL's CPU defaults (bf16 autocast, activation checkpointing) take minutes per step: one warm-up step
            clock_cb = clock(args.warmup if torch.cuda.is_available() else 1, args.budget)
            trl.add_callback(clock_cb)
            trl.train()
            results["TRL SFTTrainer defaults"] = clock_cb.tokens_per_s()
            peaks["TRL SFTTrainer defaults"] = peak_memory_gib()
            notes["TRL SFTTrainer defaults"] = (
                f"{'bf16' if trl.args.bf16 else 'fp32'}, gradient_checkpointing={trl.args.gradient_checkpointing}"
            )
            del trl
    lengths = [len(r["messages"][0]["content"]) + len(r["messages"][1]["content"]) for r in rows]
    per_token = flops_per_token(config, parameters, min(args.seq, sum(lengths) / len(lengths) / 2))
    peak = peak_flops()
    base = results.get("TRL tuned") or results.get("TRL SFTTrainer defaults")
    raw = results.get("raw PyTorch loop")
    header = ["run", "tokens/s", "vs TRL tuned", "vs raw loop", "MFU", "peak GiB", "first losses"]
    table, records = [], []
    for run, rate in results.items():
        mfu = rate * per_token / peak
        vs_trl = f"{rate / base:.2f}x" if base else "-"
        vs_raw = f"{rate / raw:.2f}x" if raw else "-"
        table.append(
            [run, round(rate), vs_trl, vs_raw, f"{100 * mfu:.1f}%", peaks.get(run) or "-", losses.get(run, "-")]
        )
        records.append({"run": run, "tokens_per_s": round(rate, 1), "vs_trl_tuned": base and round(rate / base, 3),
                        "vs_raw": raw and round(rate / raw, 3), "mfu": round(mfu, 4), "size": args.model or args.size,
                        "seq": args.seq, "batch": args.batch, "steps": args.steps, "set": args.set,
                        "peak_gib": peaks.get(run), "first_losses": losses.get(run), "note": notes.get(run),
                        "raw_runs": [round(r, 1) for r in raw_runs]})  # fmt: skip
    report("sft_throughput", header, table, records)
    stage = cfg.stages["sft"]
    print(
        f"posttrain: dtype={cfg.model.dtype}, group_by_length={stage.group_by_length}, "
        f"activation_checkpointing={stage.activation_checkpointing}; "
        + "; ".join(f"{run}: {note}" for run, note in notes.items())
    )


if __name__ == "__main__":
    main()
