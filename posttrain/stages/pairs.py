"""On-policy preference pairs: sample k replies per prompt from the parent stage's model, score
them with a reward source, keep the best and the worst of each prompt as a pair (ties skipped).

A data stage: it trains nothing and passes its parent's model on. It writes
`<stage>/pairs/{train,test}.jsonl` (conversational preference rows, with both scores) and
`<stage>/pairs/samples-{train,test}.jsonl` (every reply and its score), which a later stage
reads with `data.path: stage:<name>` (`dpo`, `kto`, ...). Iterative DPO is
`sft -> (pairs -> dpo) x N`, each round sampling the model the previous round made.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain import artifacts
from posttrain.config import require
from posttrain.data.formats import DataError
from posttrain.generation import ENGINES, ReplyDetail, Sampler, SamplingSettings
from posttrain.preemption import Preempted
from posttrain.stages.band import PassBand
from posttrain.stages.base import DataStageInputs, OnlineStageConfig, StageSpec, last_turn_text

if TYPE_CHECKING:
    from datasets import Dataset

    from posttrain.rewards import Reward

SPLITS = ("train", "test")


@dataclass
class PairsStageConfig(OnlineStageConfig):
    # defaults (conf/pairs/onpolicy.yaml holds the same)
    method: str = "pairs"
    checkpoint_steps: int = 50
    # unused by a data stage; the values its stage keys were made with
    max_length: int | None = 1024
    warmup_steps: float = 0.0
    # replies sampled per prompt (k); the best and the worst become a pair
    num_samples: int = 8
    max_new_tokens: int = 256
    # prompts per generate() call (each gives num_samples replies)
    generation_batch_size: int = 32
    # a prompt gives a pair only when best - worst > min_gap (0: every untied prompt)
    min_gap: float = 0.0
    # auto: vLLM when installed and a CUDA GPU is present, else transformers' generate
    engine: str = "auto"
    # sample for the first N train / held-out prompts of `data` (null: all of them)
    num_prompts: int | None = None
    num_eval_prompts: int | None = 200
    # pair only the prompts whose pass rate over their num_samples replies lies in [low, high]
    # (null: every untied prompt); see posttrain/stages/band.py
    band: PassBand | None = None

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.num_samples >= 2, f"{key}.num_samples", f"{self.num_samples} must be >= 2 (a best and a worst)")
        require(self.max_new_tokens > 0, f"{key}.max_new_tokens", f"{self.max_new_tokens} must be > 0")
        require(self.generation_batch_size > 0, f"{key}.generation_batch_size", "must be > 0")
        require(self.min_gap >= 0, f"{key}.min_gap", f"{self.min_gap} must be >= 0")
        require(self.engine in ENGINES, f"{key}.engine", f"{self.engine!r} is not one of {', '.join(ENGINES)}")
        for name in ("num_prompts", "num_eval_prompts"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{key}.{name}", f"{value} must be > 0 or null (all)")
        if self.band is not None:
            self.band.validate(f"{key}.band")


# --- the pair builder -----------------------------------------------------------------------


def best_and_worst(scores: Sequence[float], min_gap: float = 0.0) -> tuple[int, int] | None:
    """Indices of the highest- and lowest-scored replies (the first of equals), or None when
    they are tied (best - worst <= min_gap)."""
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    return (best, worst) if scores[best] - scores[worst] > min_gap else None


def pair_row(sample: dict, min_gap: float) -> dict | None:
    """A preference row from one prompt's scored replies, or None (tied, or the same text).
    Empty replies take no part (a preference row needs two replies)."""
    kept = [(r, x) for r, x in zip(sample["replies"], sample["scores"], strict=True) if r]
    replies, scores = [r for r, _ in kept], [x for _, x in kept]
    picked = best_and_worst(scores, min_gap) if kept else None
    if picked is None:
        return None
    best, worst = picked
    if replies[best] == replies[worst]:  # a noisy reward scored the same text twice
        return None
    row = {
        "prompt": sample["prompt"],
        "chosen": [{"role": "assistant", "content": replies[best]}],
        "rejected": [{"role": "assistant", "content": replies[worst]}],
        "chosen_score": scores[best],
        "rejected_score": scores[worst],
    }
    if sample.get("task") is not None:
        row["task"] = sample["task"]
    return row


# --- the stage --------------------------------------------------------------------------------


def _first(rows: Dataset | None, count: int | None) -> Dataset | None:
    return rows if rows is None or count is None or count >= len(rows) else rows.select(range(count))


def _chunks(rows: Dataset, size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def make_data(inputs: DataStageInputs) -> dict[str, float] | None:
    """Sample, score and pair every prompt of both splits; the metrics, or None when stopped."""
    from tqdm.auto import tqdm

    cfg = inputs.cfg
    settings = SamplingSettings(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.engine)
    sampler = Sampler(inputs.model, inputs.tokenizer, settings, inputs.source)
    out = inputs.folder / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    done, lines = resume_state(inputs.folder, inputs.checkpoint)
    splits = [
        ("train", _first(inputs.train_prompts, cfg.num_prompts)),
        ("test", _first(inputs.eval_prompts, cfg.num_eval_prompts)),
    ]
    total = sum(-(-len(rows) // cfg.generation_batch_size) for _, rows in splits if rows is not None)
    bar = tqdm(total=total, initial=sum(done.values()), desc="pairs", unit="batch")
    guard = inputs.guard
    try:
        # this process works alone (the others wait for its metrics): a signal stops it at once
        with guard.interruptible("the pairs stage's sampling and scoring", alone=True):
            for offset, (split, rows) in enumerate(splits):
                if rows is None:
                    continue
                path = out / f"samples-{split}.jsonl"
                for i, chunk in enumerate(_chunks(rows, cfg.generation_batch_size)):
                    if i < done.get(split, 0):
                        continue
                    # seeded by position: a resumed stage samples what an uninterrupted one would
                    seed = inputs.seed * 1_000_003 + offset * 100_003 + i
                    replies, details = sampler.sample_with_details(chunk["prompt"], seed=seed)
                    records = _scored(chunk, replies, details, inputs.reward)
                    with guard.shielded():  # the batch's lines and their count, together
                        _append(path, records)
                        done[split], lines[split] = i + 1, lines.get(split, 0) + len(records)
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in _sample_metrics(records, cfg.num_samples).items()})
                    if cfg.checkpoint_steps and sum(done.values()) % cfg.checkpoint_steps == 0:
                        save_checkpoint(inputs.folder, done, lines)
                    if guard.requested_here():  # the stop file (a signal to another rank or node)
                        raise Preempted(f"{guard.signal_name} during the pairs stage's sampling")
    except Preempted:
        if done:
            save_checkpoint(inputs.folder, done, lines)  # every batch sampled so far is kept
        return None
    finally:
        bar.close()
        sampler.close()
    return _write_pairs(out, cfg.min_gap, cfg.num_samples, cfg.band)


def _scored(
    chunk: dict[str, list], replies: list[list[str]], details: list[list[ReplyDetail]], reward: Reward
) -> list[dict]:
    prompts = [last_turn_text(p) for p in chunk["prompt"] for _ in replies[0]]
    flat = reward(prompts, [r for group in replies for r in group])
    k = len(replies[0])
    tasks = chunk.get("task") or [None] * len(replies)
    return [
        {
            "prompt": prompt,
            "task": task,
            "replies": group,
            "scores": flat[i * k : (i + 1) * k],
            "cut": [d.cut for d in about],
            "entropy": [d.entropy for d in about],
        }
        for i, (prompt, task, group, about) in enumerate(zip(chunk["prompt"], tasks, replies, details, strict=True))
    ]


def _sample_metrics(samples: list[dict], k: int) -> dict[str, float]:
    """What the sampled replies show: mean reward, the share of prompts whose replies all scored
    alike (no signal for a pair or a GRPO group), the share cut at max_new_tokens, their entropy."""
    metrics = {
        "reward": sum(sum(s["scores"]) for s in samples) / max(len(samples) * k, 1),
        "equal_rewards_share": sum(len(set(s["scores"])) == 1 for s in samples) / max(len(samples), 1),
    }
    cut = [c for s in samples for c in s.get("cut", [])]  # sample files written before these fields
    entropy = [e for s in samples for e in s.get("entropy", []) if e is not None]
    if cut:
        metrics["clipped_ratio"] = sum(cut) / len(cut)
    if entropy:
        metrics["entropy"] = sum(entropy) / len(entropy)
    return metrics


def _append(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_pairs(out: Path, min_gap: float, k: int, band: PassBand | None = None) -> dict[str, float]:
    """`train.jsonl` / `test.jsonl` from the scored samples, and what they hold."""
    metrics: dict[str, float] = {}
    for split in SPLITS:
        path = out / f"samples-{split}.jsonl"
        if not path.exists():
            continue
        samples = [json.loads(line) for line in path.read_text().splitlines()]
        in_band = [s for s in samples if band is None or band.keeps(s["scores"])]
        pairs = [row for s in in_band if (row := pair_row(s, min_gap)) is not None]
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in pairs))
        tmp.replace(out / f"{split}.jsonl")
        prefix = "" if split == "train" else "eval_"
        metrics[f"{prefix}prompts"] = len(samples)
        metrics[f"{prefix}pairs"] = len(pairs)
        metrics[f"{prefix}ties_skipped"] = len(in_band) - len(pairs)
        if band is not None:
            metrics[f"{prefix}band/kept_share"] = len(in_band) / max(len(samples), 1)
        for name, value in _sample_metrics(samples, k).items():
            metrics[f"{prefix}{'mean_reward' if name == 'reward' else name}"] = value
        metrics[f"{prefix}best_of_k_reward"] = sum(max(s["scores"]) for s in samples) / max(len(samples), 1)
        for task in sorted({s["task"] for s in samples if s.get("task")}):
            mine = [s for s in samples if s.get("task") == task]
            metrics[f"{prefix}mean_reward/{task}"] = sum(sum(s["scores"]) for s in mine) / (len(mine) * k)
    if not metrics.get("pairs") and band is not None:
        raise DataError(
            f"{out}: no prompt's pass rate over its {k} replies lies in band [{band.low}, {band.high}] "
            f"(kept share {metrics.get('band/kept_share', 0):.2f}), so there is no pair to learn from; widen the band"
        )
    if not metrics.get("pairs"):
        raise DataError(
            f"{out}: every prompt's {k} replies scored the same, so there is no pair to learn from; "
            "raise num_samples or temperature, or use a reward that tells replies apart"
        )
    return metrics


def resume_state(folder: Path, checkpoint: Path | None) -> tuple[dict[str, int], dict[str, int]]:
    """Chunks and sample lines of each split done at `checkpoint`; the sample files cut back to
    what it covers."""
    if checkpoint is None:
        for split in SPLITS:  # an attempt stopped before its first checkpoint: start afresh
            (folder / "pairs" / f"samples-{split}.jsonl").unlink(missing_ok=True)
        return {}, {}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    for split, lines in state["lines"].items():
        path = folder / "pairs" / f"samples-{split}.jsonl"
        kept = path.read_text().splitlines()[:lines] if path.exists() else []
        path.write_text("".join(line + "\n" for line in kept))
    return dict(state["chunks"]), dict(state["lines"])


def save_checkpoint(folder: Path, done: dict[str, int], lines: dict[str, int]) -> Path:
    """A checkpoint of the generation: how many chunks and sample lines of each split are written."""
    step = sum(done.values())
    checkpoint = folder / "checkpoints" / f"checkpoint-{step}"
    state = {"global_step": step, "chunks": done, "lines": {s: lines.get(s, 0) for s in SPLITS}, "time": time.time()}
    artifacts.write_json_atomic(checkpoint / "trainer_state.json", state)
    return checkpoint


STAGE = StageSpec(
    config_cls=PairsStageConfig,
    data_kind="prompt",
    uses_reference=False,
    make_trainer=None,
    trl_config=None,
    summary_metrics=(("pairs", "pairs"), ("mean_reward", "sample_reward")),
    model_kind="none",
    make_data=make_data,
    uses_reward=True,
)
