"""DPO pairs/s over a sweep of 3 beta values: posttrain's dpo stage vs TRL's DPOTrainer, tuned
for the device and with its defaults.

    python bench/dpo_sweep.py                         # 20M Llama, seq 512, CPU: ~10 min
    python bench/dpo_sweep.py --size qwen0.5b --seq 1024 --batch 8    # a GPU
    python bench/dpo_sweep.py --model smollm2_135m --seq 128 --batch 8 --steps 8   # real weights

The same reference model (a local folder: what an SFT stage leaves) and the same pairs for
every point. posttrain: the `dpo` stage as the pipeline builds it, reference log-probs
precomputed once (first point) and read back from beside the reference by the others.
TRL tuned: DPOConfig as a competent user sets it for the device (reference log-probs
precomputed, fp32 on a CPU or bf16 where the GPU has it, no activation checkpointing on a CPU);
each point computes its own reference pass (TRL keeps it in a temporary cache of the trainer).
TRL defaults: DPOConfig with only output_dir, batch size, max_length, steps and beta set (it
loads a second copy of the model as reference and runs it every step). Timed per point from
building the trainer (tokenization, reference log-probs) to the end of training.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import SIZE_HELP, build_model, conversations, real_model, report, trl_as_installed


def pairs(n: int, max_tokens: int) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for row in conversations(n, max_tokens):
        user, reply = row["messages"]
        words = reply["content"].split()
        rejected = " ".join(rng.sample(words, len(words)))
        rows.append({"prompt": [user], "chosen": [reply], "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def posttrain_point(model_dir: Path, rows, beta: float, args, out: Path) -> float:
    import torch
    from datasets import Dataset

    from posttrain import models
    from posttrain.config import ModelConfig
    from posttrain.ref_logps import RefLogpsCache
    from posttrain.stages import STAGES
    from posttrain.stages.base import TrainerInputs

    cfg = ModelConfig(path=str(model_dir))
    stage = STAGES["dpo"].config_cls(method="dpo", beta=beta, max_length=args.seq)
    train_args = dict(
        output_dir=str(out / f"beta{beta}"), per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, max_length=args.seq, max_steps=args.steps, learning_rate=5e-7,
        use_cpu=not torch.cuda.is_available(), bf16=models.compute_dtype("auto") == torch.bfloat16,
        report_to="none", save_strategy="no", disable_tqdm=True, activation_checkpointing=False,
    )  # fmt: skip
    # as the pipeline loads a fully trained policy
    model = models.load_model(str(model_dir), cfg, dtype=models.weights_dtype(cfg.dtype, trained=True))
    start = time.perf_counter()
    inputs = TrainerInputs(
        cfg=stage, model=model, ref_model=None, tokenizer=models.load_tokenizer(str(model_dir), cfg),
        train_dataset=Dataset.from_list(rows), eval_dataset=None, args=train_args, peft_config=None,
        ref_logps=RefLogpsCache(out / "ref_logps", "reference", "bench"),
    )  # fmt: skip
    STAGES["dpo"].make_trainer(inputs).train()
    return args.batch * args.steps / (time.perf_counter() - start)


def trl_point(model_dir: Path, rows, beta: float, args, out: Path, tuned: bool) -> float:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trl_as_installed()
    cuda = torch.cuda.is_available()
    device_settings = {}
    if tuned:
        bf16 = cuda and torch.cuda.is_bf16_supported()
        device_settings = dict(precompute_ref_log_probs=True, bf16=bf16, activation_checkpointing=cuda,
                               per_device_eval_batch_size=args.batch)  # fmt: skip
    config = DPOConfig(
        output_dir=str(out / f"trl{beta}{tuned}"), per_device_train_batch_size=args.batch, max_length=args.seq,
        max_steps=args.steps, beta=beta, learning_rate=5e-7, use_cpu=not cuda,
        report_to="none", save_strategy="no", disable_tqdm=True, **device_settings,
    )  # fmt: skip
    start = time.perf_counter()
    DPOTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(rows)).train()
    return args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20m", help=SIZE_HELP)
    parser.add_argument("--model", help="a registry model's real weights instead of --size: smollm2_135m")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--betas", default="0.05,0.1,0.5")
    args = parser.parse_args()
    betas = [float(b) for b in args.betas.split(",")]
    rows = pairs(args.batch * args.steps, args.seq)
    totals = {"posttrain": [], "TRL tuned": [], "TRL defaults": []}
    table, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = real_model(args.model) if args.model else build_model(args.size, Path(tmp), args.seq)
        for beta in betas:
            ours = posttrain_point(model_dir, rows, beta, args, Path(tmp))
            tuned = trl_point(model_dir, rows, beta, args, Path(tmp), tuned=True)
            default = trl_point(model_dir, rows, beta, args, Path(tmp), tuned=False)
            for name, rate in zip(totals, (ours, tuned, default), strict=True):
                totals[name].append(rate)
            table.append([f"beta {beta:g}", round(ours, 2), round(tuned, 2), round(default, 2),
                          f"{ours / tuned:.2f}x", f"{ours / default:.2f}x"])  # fmt: skip
    mean = {name: len(rates) / sum(1 / r for r in rates) for name, rates in totals.items()}  # pairs per second overall
    ours = mean["posttrain"]
    table.append(["sweep", *(round(mean[name], 2) for name in totals),
                  f"{ours / mean['TRL tuned']:.2f}x", f"{ours / mean['TRL defaults']:.2f}x"])  # fmt: skip
    for name, rates in totals.items():
        rounded = [round(r, 3) for r in rates]
        settings = {"size": args.model or args.size, "seq": args.seq, "batch": args.batch, "steps": args.steps,
                    "betas": betas}  # fmt: skip
        records.append({"run": name, "pairs_per_s": rounded, "sweep_pairs_per_s": round(mean[name], 3), **settings})
    header = [
        "point",
        "posttrain pairs/s",
        "TRL tuned pairs/s",
        "TRL default pairs/s",
        "vs TRL tuned",
        "vs TRL defaults",
    ]
    report("dpo_sweep", header, table, records)


if __name__ == "__main__":
    main()
