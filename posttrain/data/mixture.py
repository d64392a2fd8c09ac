"""Held-out splits and mixtures of sources, deterministic from the run's seed.

A source with `rows: N` gives exactly N rows (repeated when it has fewer); sources with a
`weight` share the rest of the mixture in proportion (its size: `max_rows` minus the fixed
rows, else the weighted sources' own row count), repeating a source whose share exceeds
its rows; a source with neither gives each of its rows once.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from posttrain.data.formats import DataError

if TYPE_CHECKING:
    from posttrain.config import SourceConfig


@dataclass
class Part:
    """One source's checked rows on their way into the mixture."""

    src: SourceConfig
    label: str
    format: str
    train: list[dict]
    held_out: list[dict]
    # curation filter -> rows it removed from `train`
    removed: dict[str, int] = field(default_factory=dict)


def prompt_key(row: dict) -> str:
    """What a held-out split must not share with training: the prompt (conversation minus its last reply)."""
    prompt = row["prompt"] if "prompt" in row else row["messages"][:-1]
    return json.dumps(prompt, sort_keys=True)


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off `fraction` of the rows (at least one row when fraction > 0) by prompt: rows that
    share a prompt (several pairs for one prompt) land on the same side."""
    if fraction <= 0:
        return rows, []
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(prompt_key(row), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target, chosen = math.ceil(len(rows) * fraction), set()
    for key in keys:
        if len(chosen) >= target:
            break
        chosen.update(groups[key])
    if len(chosen) == len(rows):
        raise DataError(f"eval_fraction={fraction} leaves no train rows out of {len(rows)}; lower it")
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def _take(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n rows: a seeded sample, or every row repeated and then a sample for the remainder."""
    whole, rest = divmod(n, len(rows))
    return rows * whole + rng.sample(rows, rest)


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` in proportion to `weights`, rounding by largest remainder (sums to total)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(parts: list[Part], max_rows: int | None, seed: int) -> tuple[list[dict], list[int]]:
    """The stage's train rows and how many each part gave; shuffled when there are several parts."""
    rng = random.Random(seed)
    counts: list[int | None] = [p.src.rows if p.src.rows is not None else None for p in parts]
    weighted = [i for i, p in enumerate(parts) if p.src.weight is not None]
    for i, p in enumerate(parts):
        if counts[i] is None and p.src.weight is None:
            counts[i] = len(p.train)
    if weighted:
        fixed = sum(c for c in counts if c is not None)
        budget = max_rows - fixed if max_rows is not None else sum(len(parts[i].train) for i in weighted)
        if budget <= 0:
            raise DataError(f"max_rows={max_rows} leaves no room for the weighted sources after {fixed} fixed rows")
        for i, n in zip(weighted, _apportion(budget, [parts[i].src.weight for i in weighted]), strict=True):
            counts[i] = n
    rows: list[dict] = []
    for p, n in zip(parts, counts, strict=True):
        if n and not p.train:
            raise DataError(f"{p.label}: no rows left after curation, but the mixture asks for {n}")
        rows += _take(p.train, n, rng) if n else []
    if len(parts) > 1:
        rng.shuffle(rows)
    if not weighted and max_rows is not None and len(rows) > max_rows:
        rows = cap(rows, max_rows, seed)
    return rows, [n or 0 for n in counts]


def cap(rows: list[dict], max_rows: int | None, seed: int) -> list[dict]:
    """At most `max_rows` rows, a seeded sample in their original order."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
    return [rows[i] for i in keep]
