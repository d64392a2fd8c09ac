"""The online stages' reward in the real-model tests: the built-in graded reward, shorter replies
breaking ties (a model two SFT steps in is rarely right; all-equal rewards give no pair and no
GRPO gradient)."""

from __future__ import annotations

from posttrain.rewards import builtin_partial_reward


def graded_then_shorter(prompts: list[str], completions: list[str]) -> list[float]:
    graded = builtin_partial_reward(prompts, completions)
    return [score - len(reply) / 100 for score, reply in zip(graded, completions, strict=True)]
