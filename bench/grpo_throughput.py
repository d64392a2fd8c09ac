"""GRPO samples/s: posttrain's grpo stage vs TRL's GRPOTrainer tuned for the device.

    python bench/grpo_throughput.py                   # tiny Llama, CPU: ~1.5 min
    python bench/grpo_throughput.py --size llama3_2_1b --prompts-per-step 8 --max-completion-length 128  # a GPU
    python bench/grpo_throughput.py --model smollm2_135m --max-completion-length 16 --steps 4   # real weights

Same random-init model (a local folder, loaded with from_pretrained; `--size` a registry name
builds that model's shape from conf/model/<name>.yaml; `--model` a registry model's real weights,
tokenizer and chat template), same built-in task prompts (builtin:sft's
kind), the same cheap deterministic reward (the built-in checker, `reward: builtin`), one process.
posttrain: the `grpo` stage exactly as `posttrain align=grpo` builds it (composed config, the tuned
settings that apply, training args chosen for the device, TRL underneath). TRL tuned: GRPOConfig as
a competent user sets it for the device (bf16 weights on a GPU with bf16 units, else fp32; flash
attention when flash-attn is installed, else sdpa; no activation checkpointing; vLLM colocated when
vllm is installed and CUDA is present, else transformers' generate), with posttrain's
num_generations, batch, max_completion_length, temperature and learning rate. A random-init model
rarely ends a reply early, so replies run to max_completion_length in both runs.

Samples/s: sampled completions over the wall time of the timed steps (the first `--warmup` steps
are not timed; `--budget` seconds at most), measured at step boundaries; completion tokens/s from TRL's per-step
`completions/mean_length`. Prints a table and appends to results/grpo_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import SIZE_HELP, build_model, real_model, report, stage_trainer, trl_as_installed

RUNS = ("posttrain", "trl")


def prompts(n: int) -> list[dict]:
    """`n` built-in task prompts (add, reverse, sort, count in turn), in the `prompt` format."""
    from posttrain.data.builtin import TaskSpec, generate

    problems = generate(TaskSpec(), n, random.Random(0), exclude=set())
    return [{"prompt": [{"role": "user", "content": p.prompt}]} for p in problems]


def clock(warmup: int, budget: float):
    """Wall time at each step's end after `warmup` steps, and each timed step's mean completion
    length (the trainer logs every step); ends training once `budget` seconds were timed (a slow
    configuration still gives its rate)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        start = end = None
        lengths: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if state.global_step == warmup:
                self.start = now
            self.end = now
            if self.start is not None and now - self.start > budget:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step > warmup and logs and "completions/mean_length" in logs:
                self.lengths = [*self.lengths, logs["completions/mean_length"]]

        def seconds(self) -> float:
            return self.end - self.start

    return Clock()


def posttrain_config(model_dir: Path, args):
    """The composed config of `posttrain align=grpo` with the benchmark's settings."""
    from posttrain.cli import compose_tree
    from posttrain.plan import load_config

    overrides = [
        *([f"model={args.model}"] if args.model else [f"model.path={model_dir}"]),
        "run.tuned_for=null",  # a speed benchmark keeps the default stage settings on this model
        "align=grpo",
        f"align.max_steps={args.steps + args.warmup}",
        f"align.per_device_train_batch_size={args.prompts_per_step * args.num_generations}",
        f"align.num_generations={args.num_generations}",
        f"align.max_completion_length={args.max_completion_length}",
        "align.reward=builtin",
        *args.set,
        "align.logging_steps=1",
        "align.checkpoint_steps=0",
    ]
    return load_config(compose_tree(overrides))


def builtin_checker(prompts, completions, **kwargs) -> list[float]:
    """The built-in tasks' checker as a TRL reward function (conversational prompts and replies)."""
    from posttrain.rewards import builtin_reward

    return builtin_reward([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])


def trl_tuned_trainer(model_dir: Path, rows, args, stage, out: Path):
    """TRL's GRPOTrainer as a competent user sets it up on this device (see the module docstring),
    with the sampling and batch settings of posttrain's stage."""
    import importlib.util

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    vllm = cuda and importlib.util.find_spec("vllm") is not None
    trl_as_installed()
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=stage.per_device_train_batch_size,
        num_generations=stage.num_generations, max_completion_length=stage.max_completion_length,
        temperature=stage.temperature, top_p=stage.top_p, beta=stage.beta, learning_rate=stage.learning_rate,
        max_steps=args.steps + args.warmup, use_cpu=not cuda, bf16=bf16, activation_checkpointing=False,
        model_init_kwargs={"attn_implementation": attn, "dtype": torch.bfloat16 if bf16 else torch.float32},
        use_vllm=vllm, vllm_mode="colocate", report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=builtin_checker, args=config, train_dataset=Dataset.from_list(rows)
    )
    return trainer, f"{'bf16' if bf16 else 'fp32'} weights, {attn}, {'vLLM colocate' if vllm else 'generate'}"


def measure(trainer, args) -> dict:
    """Samples/s and completion tokens/s of `trainer` over its timed steps."""
    clock_cb = clock(args.warmup, args.budget)
    trainer.add_callback(clock_cb)
    trainer.train()
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    per_step *= trainer.accelerator.num_processes
    seconds, steps = clock_cb.seconds(), trainer.state.global_step - args.warmup
    return {
        "samples_per_s": per_step * steps / seconds,
        "completion_tokens_per_s": per_step * sum(clock_cb.lengths) / seconds,
        "mean_completion_length": sum(clock_cb.lengths) / max(len(clock_cb.lengths), 1),
        "timed_steps": steps,
        "seconds": seconds,
        "samples_per_step": per_step,
    }


def free_memory() -> None:
    import gc

    import torch

    gc.collect()  # the trainer's model and optimizer (reward closures hold the trainer in a cycle)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny" if not torch.cuda.is_available() else "qwen0.5b", help=SIZE_HELP)
    parser.add_argument("--model", help="a registry model's real weights instead of --size: smollm2_135m")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds timed per run at most")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which runs, comma-separated: {', '.join(RUNS)}")
    parser.add_argument("--set", action="append", default=[], help="a posttrain override: align.temperature=1.0")
    args = parser.parse_args()
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: {', '.join(unknown)}: allowed {', '.join(RUNS)}")
    rows = prompts(args.prompts_per_step * (args.steps + args.warmup) * 2)
    results, notes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = (
            real_model(args.model) if args.model else build_model(args.size, folder, args.max_completion_length + 64)
        )
        cfg = posttrain_config(model_dir, args)
        stage = cfg.stages["align"]  # TRL takes its sampling and batch settings from posttrain's stage
        for run in runs:  # in the order given (`--runs trl,posttrain` checks that order does not matter)
            if run == "posttrain":
                # the `grpo` stage's trainer as the pipeline builds it
                trainer = stage_trainer(cfg, "align", model_dir, rows, folder / "posttrain", {"disable_tqdm": True})
                name = "posttrain grpo"
                notes[name] = (
                    f"{str(trainer.model.dtype).removeprefix('torch.')} weights, bf16={trainer.args.bf16}, "
                    f"{trainer.model.config._attn_implementation}, "
                    f"{'vLLM colocate' if trainer.args.use_vllm else 'generate'}, "
                    f"checkpointing={trainer.args.activation_checkpointing}"
                )
            else:
                name = "TRL tuned"
                trainer, notes[name] = trl_tuned_trainer(model_dir, rows, args, stage, folder / "trl")
            results[name] = measure(trainer, args)
            print(f"[bench] {name}: {results[name]['samples_per_s']:.2f} samples/s", flush=True)
            del trainer
            free_memory()  # the GPU holds one policy at a time
    base = results.get("TRL tuned")
    header = ["run", "samples/s", "completion tokens/s", "mean reply tokens", "vs TRL tuned", "timed", "setup"]
    table, records = [], []
    settings = {
        "size": args.model or args.size, "steps": args.steps, "warmup": args.warmup,
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
        "temperature": stage.temperature, "set": args.set,
    }  # fmt: skip
    for run, r in sorted(results.items(), key=lambda item: item[0] != "posttrain grpo"):  # posttrain first
        ratio = r["samples_per_s"] / base["samples_per_s"] if base else None
        table.append([
            run, round(r["samples_per_s"], 2), round(r["completion_tokens_per_s"], 1),
            round(r["mean_completion_length"], 1), f"{ratio:.2f}x" if ratio else "-",
            f"{r['timed_steps']} steps x {r['samples_per_step']} in {r['seconds']:.1f} s", notes[run],
        ])  # fmt: skip
        records.append({
            "run": run, **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()},
            "vs_trl_tuned": ratio and round(ratio, 3), "note": notes[run], **settings,
        })  # fmt: skip
    report("grpo_throughput", header, table, records)


if __name__ == "__main__":
    main()
