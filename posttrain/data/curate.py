"""Curation of a stage's rows (the LIMA lesson: a small clean set beats a big noisy one).

Filters, in order, each counted per source: rows with an empty turn, pairs whose chosen and
rejected replies are the same, duplicates (exact, or ignoring case, whitespace and
punctuation; across all sources, the first kept), train rows identical to a held-out row,
and, with a tokenizer, rows shorter than `min_tokens` or (with `overlong: drop`) longer
than the stage's `max_length`. The report gives what each filter removed and the token
lengths of what is left.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from posttrain.config import DataSource
    from posttrain.data.mixture import Part

# rows whose tokens are counted for the report when no length filter needs every row counted
SAMPLE = 20_000
# what removed rows; "low score": curation by score (posttrain/data/score.py), after the others
FILTERS = ("empty turn", "chosen = rejected", "duplicate", "in held-out", "too short", "too long", "low score")
PUNCTUATION = re.compile(r"[^\w\s]")
SPACES = re.compile(r"\s+")


def _turns(row: dict) -> list[dict]:
    return [m for name in ("messages", "prompt", "chosen", "rejected", "completion") for m in row.get(name, ())]


def has_empty_turn(row: dict) -> bool:
    return any(not m["content"].strip() for m in _turns(row) if m["role"] != "system")


def same_replies(row: dict) -> bool:
    return "chosen" in row and row["chosen"] == row["rejected"]


def exact_key(row: dict) -> bytes:
    text = json.dumps({k: v for k, v in row.items() if k != "task"}, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def normalized_key(row: dict) -> bytes:
    """Same key for rows that differ only in case, whitespace or punctuation."""
    parts = [name for name in ("messages", "prompt", "chosen", "rejected", "completion", "label") if name in row]
    text = json.dumps(
        [[(m["role"], SPACES.sub(" ", PUNCTUATION.sub(" ", m["content"].lower())).strip()) for m in row[p]]
         if isinstance(row[p], list) else row[p] for p in parts],
        ensure_ascii=False,
    )  # fmt: skip
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def conversations(row: dict) -> list[list[dict]]:
    """The token sequences a trainer builds from a row (a pair: prompt + each reply)."""
    if "messages" in row:
        return [row["messages"]]
    if "chosen" in row:
        return [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
    return [row["prompt"] + row.get("completion", [])]


def token_lengths(rows: list[dict], tokenizer: PreTrainedTokenizerBase, batch: int = 2000) -> list[int]:
    """Tokens of each row's longest sequence under the tokenizer's chat template."""
    from tqdm.auto import tqdm

    lengths: list[int] = []
    bar = tqdm(total=len(rows), desc="Counting tokens", unit="row", disable=len(rows) < 20_000, leave=False)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        convs = [c for row in chunk for c in conversations(row)]
        texts = tokenizer.apply_chat_template(convs, tokenize=False)
        counts = iter(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        lengths += [max(next(counts) for _ in conversations(row)) for row in chunk]
        bar.update(len(chunk))
    bar.close()
    return lengths


@dataclass
class Curation:
    """What curation did to a stage's sources."""

    settings: DataSource
    max_length: int | None
    # token lengths of the rows kept (every source), empty without a tokenizer
    lengths: list[int] = field(default_factory=list)
    # rows measured (before the length filters) and how many of them exceed max_length
    measured: int = 0
    over_max_length: int = 0
    # set when the lengths come from a sample: how many rows it was drawn from
    sampled_from: int | None = None

    def totals(self, parts: list[Part]) -> dict[str, int]:
        return {f: sum(p.removed.get(f, 0) for p in parts) for f in FILTERS}

    def removed_text(self, parts: list[Part]) -> str:
        removed = [f"{name} {n}" for name, n in self.totals(parts).items() if n]
        return "removed: " + (", ".join(removed) if removed else "nothing")

    def report(self, parts: list[Part], used: list[int], train_rows: int, eval_rows: int) -> dict[str, Any]:
        sources = [
            {
                "source": p.label,
                "format": p.format,
                "weight": p.src.weight,
                "rows_setting": p.src.rows,
                "loaded": len(p.train) + sum(p.removed.values()) + len(p.held_out),
                "held_out": len(p.held_out),
                "removed": dict(p.removed),
                "kept": len(p.train),
                "used": n,
            }
            for p, n in zip(parts, used, strict=True)
        ]
        report = {
            "sources": sources,
            "removed": self.totals(parts),
            "train_rows": train_rows,
            "eval_rows": eval_rows,
            "dedup": self.settings.dedup,
            "overlong": self.settings.overlong,
        }
        if self.lengths:
            share = self.over_max_length / self.measured
            report["tokens"] = length_stats(self.lengths, self.max_length)
            report["tokens"]["over_max_length_share"] = round(share, 4)
            if self.sampled_from is None:
                report["tokens"]["over_max_length"] = self.over_max_length
            else:  # estimated from a sample of the rows
                report["tokens"]["over_max_length"] = round(share * self.sampled_from)
                report["tokens"]["sampled_rows"] = self.measured
        return report


def length_stats(lengths: list[int], max_length: int | None) -> dict[str, Any]:
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "rows": len(ordered),
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
        "max_length": max_length,
    }


def _drop(part: Part, name: str, keep: Callable[[dict], bool]) -> None:
    before = len(part.train)
    part.train = [row for row in part.train if keep(row)]
    part.removed[name] = part.removed.get(name, 0) + before - len(part.train)


def curate(
    parts: list[Part],
    settings: DataSource,
    tokenizer: PreTrainedTokenizerBase | None,
    max_length: int | None,
) -> Curation:
    """Apply the filters to every part's train rows in place (held-out rows: the first two)."""
    for part in parts:
        part.removed = dict.fromkeys(FILTERS, 0)
        part.held_out = [r for r in part.held_out if not (has_empty_turn(r) or same_replies(r))]
        _drop(part, "empty turn", lambda r: not has_empty_turn(r))
        _drop(part, "chosen = rejected", lambda r: not same_replies(r))
    key = normalized_key if settings.dedup == "normalized" else exact_key
    if settings.dedup != "none":
        seen: set[bytes] = set()

        def first_time(row: dict) -> bool:
            k = key(row)
            if k in seen:
                return False
            seen.add(k)
            return True

        for part in parts:
            _drop(part, "duplicate", first_time)
    if settings.drop_held_out_overlap:
        held_out = {key(r) for part in parts for r in part.held_out}
        for part in parts:
            _drop(part, "in held-out", lambda r: key(r) not in held_out)
    curation = Curation(settings, max_length)
    if tokenizer is None:
        return curation
    too_long = settings.overlong == "drop" and max_length is not None
    if settings.min_tokens == 0 and not too_long:
        _measure_sample(parts, curation, tokenizer)
        return curation
    for part in parts:
        lengths = token_lengths(part.train, tokenizer)
        ok = [settings.min_tokens <= n and not (too_long and n > max_length) for n in lengths]
        part.removed["too short"] = sum(n < settings.min_tokens for n in lengths)
        part.removed["too long"] = len(ok) - sum(ok) - part.removed["too short"]
        part.train = [row for row, keep in zip(part.train, ok, strict=True) if keep]
        curation.lengths += [n for n, keep in zip(lengths, ok, strict=True) if keep]
        curation.measured += len(lengths)
        curation.over_max_length += sum(n > max_length for n in lengths) if max_length is not None else 0
    return curation


def _measure_sample(parts: list[Part], curation: Curation, tokenizer: PreTrainedTokenizerBase) -> None:
    """No length filter is on: the report's token statistics come from a seeded sample of at
    most SAMPLE rows (tokenizing 200k long conversations takes minutes; a sample, seconds)."""
    total = sum(len(p.train) for p in parts)
    rng = random.Random(0)
    for part in parts:
        k = min(len(part.train), math.ceil(SAMPLE * len(part.train) / max(total, 1)))
        lengths = token_lengths(rng.sample(part.train, k), tokenizer)
        curation.lengths += lengths
        curation.measured += k
        if curation.max_length is not None:
            curation.over_max_length += sum(n > curation.max_length for n in lengths)
    curation.sampled_from = total if curation.measured < total else None
