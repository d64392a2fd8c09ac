"""Prompts at the edge of competence (`<stage>.band`). GRPO: every `every` steps the current
model answers a pool of prompts `samples` times each, and training samples only the prompts whose
pass rate lies in [low, high]. pairs: a prompt gives a pair only when the pass rate of its
`num_samples` replies lies in [low, high] (`PassBand`). A prompt every reply passes, or every
reply fails, gives its group equal rewards and so no gradient (TRL logs the share of such groups
as `frac_reward_zero_std`).

Built around TRL's GRPOTrainer without changing its loop: `BandSampler` is its RepeatSampler
drawing from the kept prompts, and `BandCallback` refreshes them and logs `band/kept_share`.

    band: {low: 0.1, high: 0.9, samples: 4, pool: 64, every: 20}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.config import require


@dataclass
class PassBand:
    """The pass rates kept: low <= rate <= high (a reply passes when its reward >= pass_reward)."""

    # the lowest pass rate kept (a prompt's share of passing replies)
    low: float = 0.1
    # the highest pass rate kept
    high: float = 0.9
    # the reward a reply needs to pass (1.0: the exact answer of the built-in checkers)
    pass_reward: float = 1.0

    def validate(self, key: str) -> None:
        require(
            0 <= self.low <= self.high <= 1, f"{key}.low", f"need 0 <= low <= high <= 1, got {self.low}, {self.high}"
        )

    def keeps(self, rewards: Sequence[float]) -> bool:
        """Whether the pass rate of one prompt's replies (their rewards) lies in the band."""
        return bool(in_band(pass_rates(rewards, len(rewards), self.pass_reward), self))


@dataclass
class BandConfig(PassBand):
    """GRPO's band: PassBand, re-scored on a fresh pool of prompts every `every` steps."""

    # replies per pool prompt when scoring (the pass rate's resolution)
    samples: int = 4
    # prompts scored per refresh (drawn anew each time)
    pool: int = 64
    # optimizer steps between refreshes
    every: int = 20

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.samples >= 2, f"{key}.samples", f"{self.samples} must be >= 2 (a rate between 0 and 1)")
        require(self.pool >= 1, f"{key}.pool", f"{self.pool} must be >= 1")
        require(self.every >= 1, f"{key}.every", f"{self.every} must be >= 1")


def pass_rates(rewards: Sequence[float], samples: int, pass_reward: float) -> list[float]:
    """The share of each prompt's `samples` consecutive rewards that pass."""
    return [sum(r >= pass_reward for r in rewards[i : i + samples]) / samples for i in range(0, len(rewards), samples)]


def in_band(rates: Sequence[float], band: PassBand) -> list[int]:
    """Positions of the rates inside [low, high]."""
    return [i for i, rate in enumerate(rates) if band.low <= rate <= band.high]


def band_sampler(base_cls: type):
    """TRL's RepeatSampler (passed in: TRL is imported by the stage) drawing only from `kept`
    (None: every prompt). An epoch has as many generation batches as without a band; the kept
    prompts are drawn in shuffled turns, so a band smaller than a batch still fills it. A refresh
    takes effect from the next generation batch."""

    class BandSampler(base_cls):
        kept: set[int] | None = None

        def __iter__(self):
            import torch

            order = torch.randperm(self.num_samples, generator=self.generator).tolist()
            turn: list[int] = []
            for start in range(0, self.num_samples - self.batch_size + 1, self.batch_size):
                if self.kept is None:
                    chunk = order[start : start + self.batch_size]
                else:
                    chunk = []
                    while len(chunk) < self.batch_size:
                        turn = [i for i in turn if i in self.kept]  # a refresh drops the prompts it left out
                        if not turn:
                            kept = sorted(self.kept)
                            turn = [kept[i] for i in torch.randperm(len(kept), generator=self.generator).tolist()]
                        chunk.append(turn.pop())
                for _ in range(self.repeat_count):
                    for i in chunk:
                        yield from [i] * self.mini_repeat_count

    return BandSampler


def band_callback(trainer: Any, band: BandConfig, score: Callable[[list[int]], list[float]], seed: int):
    """A TrainerCallback that, at the start and every `band.every` steps, scores a fresh pool of
    prompt indices (`score(indices)` -> their pass rates, the same on every rank) and keeps those
    in the band; a pool with none in the band keeps every prompt."""
    import random

    from transformers import TrainerCallback

    rng = random.Random(seed)

    class BandCallback(TrainerCallback):
        def refresh(self, state) -> None:
            sampler = trainer.band_sampler
            pool = rng.sample(range(sampler.num_samples), min(band.pool, sampler.num_samples))
            rates = score(pool)
            kept = {pool[i] for i in in_band(rates, band)}
            sampler.kept = kept or None
            share = len(kept) / len(pool)
            trainer._metrics["train"]["band/kept_share"].append(share)

        def on_train_begin(self, args, state, control, **kwargs):
            self.refresh(state)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % band.every == 0 and state.global_step < state.max_steps:
                self.refresh(state)

    return BandCallback()
