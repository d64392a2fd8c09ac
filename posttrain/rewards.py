"""Reward sources for the online stages (`pairs`, `grpo`): one interface, three kinds.

    reward: builtin                   the built-in tasks' checker: 1.0 for the exact answer, else 0.0
    reward: builtin_partial           the same tasks graded: the share of the answer's digits or
                                      letters the reply has in the right place (1.0 when exact)
    reward: <stage>                   a reward model trained by an earlier `rm` stage of the chain,
                                      or a folder that holds one (its manifest says method rm)
    reward: my_pkg.rewards:score      a function score(prompts, completions) -> one float per completion

Every source is called the same way: `prompts` are the text of each prompt's last user turn,
`completions` the generated replies (text), in the same order; it returns one finite float
per completion. A function that raises or returns the wrong shape stops the stage with an
error naming it.

Several sources with weights (`reward: [builtin, my_pkg.rewards:fmt]`, `reward_weights: [1.0,
0.3]`) score a reply with the weighted sum of their scores, as TRL's GRPOTrainer sums its
reward functions (grpo hands TRL the sources and weights themselves, so each is logged on its own).

    reward = load_reward("builtin", "pairs.reward", {})
    reward(["What is 2 + 3?"], ["5"])       # [1.0]
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain import artifacts, models
from posttrain.artifacts import hash_json
from posttrain.data.builtin import partial_credit, solve
from posttrain.errors import ConfigError, PosttrainError

BUILTIN = "builtin"
BUILTIN_PARTIAL = "builtin_partial"


class RewardError(PosttrainError):
    """A reward function failed or returned something other than one float per completion."""


# --- the built-in tasks' checker ----------------------------------------------------------


def builtin_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 when the completion (whitespace-stripped) is the exact answer, else 0.0."""
    return [float(completion.strip() == answer) for answer, completion in _answers(BUILTIN, prompts, completions)]


def builtin_partial_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The share of the answer's digits or letters that the completion has in the right place."""
    return [
        partial_credit(answer, completion) for answer, completion in _answers(BUILTIN_PARTIAL, prompts, completions)
    ]


def _answers(name: str, prompts: Sequence[str], completions: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        answer = solve(prompt)
        if answer is None:
            raise RewardError(
                f"reward {name}: {prompt[:80]!r} is not a built-in task prompt; the built-in checker "
                "scores only builtin:sft / builtin:preference prompts (use a reward model or module:function)"
            )
        out.append((answer, completion))
    return out


BUILTIN_REWARDS = {BUILTIN: builtin_reward, BUILTIN_PARTIAL: builtin_partial_reward}


# --- one interface ------------------------------------------------------------------------


class Reward:
    """A named reward source: `reward(prompts, completions)` -> checked list of floats."""

    def __init__(self, name: str, function: Callable[[list[str], list[str]], Any]):
        self.name, self.function = name, function

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        prompts, completions = list(prompts), list(completions)
        try:
            scores = self.function(prompts, completions)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward {self.name} raised {type(e).__name__}: {e}") from e
        return checked_scores(self.name, scores, len(completions))


def checked_scores(name: str, scores: Any, count: int) -> list[float]:
    """`scores` as a list of `count` finite floats, or RewardError naming the function."""
    if hasattr(scores, "tolist"):  # a tensor or numpy array
        scores = scores.tolist()
    if not isinstance(scores, list | tuple):
        raise RewardError(f"reward {name} returned {type(scores).__name__}; expected a list of {count} floats")
    if len(scores) != count:
        raise RewardError(f"reward {name} returned {len(scores)} scores for {count} completions")
    out = []
    for i, value in enumerate(scores):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RewardError(f"reward {name}: score {i} is {value!r}; expected a finite number")
        out.append(float(value))
    return out


class WeightedReward(Reward):
    """Several reward sources scoring each reply with the weighted sum of their scores."""

    def __init__(self, sources: list[Reward], weights: list[float]):
        self.sources, self.weights = sources, weights
        super().__init__("+".join(source.name for source in sources), self._sum)

    def _sum(self, prompts: list[str], completions: list[str]) -> list[float]:
        scored = [source(prompts, completions) for source in self.sources]
        return [
            sum(w * scores[i] for w, scores in zip(self.weights, scored, strict=True)) for i in range(len(completions))
        ]


def reward_specs(reward: str | list[str]) -> list[str]:
    """A stage's `reward` as a list of sources."""
    return [reward] if isinstance(reward, str) else list(reward)


def import_function(spec: str, key: str) -> Callable:
    """`module:function` imported; ConfigError naming `key` when it cannot be."""
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {spec!r} ({e})") from None
    if not callable(function):
        raise ConfigError(f"{key}: {spec!r} is not a function")
    return function


def is_function(spec: str) -> bool:
    return ":" in spec


def function_identity(spec: str, key: str) -> dict[str, str]:
    """What names a user's reward function in a stage key: its import path and its source
    code, so editing the function makes the stage (and what follows) train again."""
    function = import_function(spec, key)
    try:
        source = inspect.getsource(inspect.getmodule(function) or function)
    except (OSError, TypeError):
        source = ""
    return {"function": spec, "source": hash_json(source)}


def load_rewards(
    specs: str | list[str], weights: list[float] | None, key: str, reward_models: dict[str, str], model_cfg, tokenizer
) -> WeightedReward:
    """Every reward source a stage names, with its weight (default 1.0 each)."""
    specs = reward_specs(specs)
    sources = [load_reward(spec, key, reward_models, model_cfg, tokenizer) for spec in specs]
    return WeightedReward(sources, list(weights) if weights is not None else [1.0] * len(sources))


def load_reward(spec: str, key: str, reward_models: dict[str, str], model_cfg=None, tokenizer=None) -> Reward:
    """The reward source `spec` names (see the module doc); `reward_models` maps the names of
    earlier `rm` stages to their folders."""
    if spec in BUILTIN_REWARDS:
        return Reward(spec, BUILTIN_REWARDS[spec])
    if is_function(spec):
        return Reward(spec, import_function(spec, key))
    folder = reward_models.get(spec) or spec
    scorer = RewardModelScorer(Path(folder).expanduser(), model_cfg, tokenizer)
    return Reward(spec, scorer)


class RewardModelScorer:
    """Scores prompt + completion with a reward model artifact (`*ForSequenceClassification`,
    one logit), the conversation rendered by the tokenizer's chat template as the rm stage
    trained it."""

    def __init__(self, folder: Path, model_cfg, tokenizer, batch_size: int = 32):
        model = models.load_model(str(folder), model_cfg, "reward", pad_token_id=tokenizer.pad_token_id)
        self.model = models.on_accelerator(model).eval()
        self.tokenizer, self.batch_size = tokenizer, batch_size

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        conversations = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            for p, c in zip(prompts, completions, strict=True)
        ]
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in batch]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                logits = self.model(**enc.to(self.model.device)).logits
            scores += logits[:, 0].float().cpu().tolist()
        return scores


def check_reward_spec(spec: str, key: str, earlier_reward_models: list[str]) -> None:
    """Plan-time check of a `reward` value: builtin, module:function, an earlier rm stage, or
    a folder that holds a reward model artifact."""
    if spec in BUILTIN_REWARDS or spec in earlier_reward_models:
        return
    if is_function(spec):
        module, _, name = spec.partition(":")
        if not (module and name):
            raise ConfigError(f"{key}: {spec!r} is not module:function")
        import_function(spec, key)
        return
    folder = Path(spec).expanduser()
    manifest = artifacts.read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and manifest.get("method") == "rm" and manifest.get("status") == "complete":
        return
    stages = ", ".join(earlier_reward_models) or "none in this chain"
    raise ConfigError(
        f"{key}: {spec!r} is not {', '.join(BUILTIN_REWARDS)}, module:function, an earlier rm stage ({stages}) "
        "or a folder holding a complete rm artifact"
    )
