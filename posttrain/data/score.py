"""Curation by score (the LIMA lesson: a small set of excellent rows beats a large noisy one).

After the structural filters (`curate`), each train row of a stage is scored and the best are
kept: `data.<kind>.score.by` names the scorer (any reward source, `posttrain/rewards.py`: the
built-in checker, `my_pkg.rewards:score`, an earlier rm stage; the pipeline builds it), and
`keep` (a count or a share), `min_score` and `balance` (by source or by task) say which rows stay.

A row is scored on its last user turn and its reply; a preference pair on the margin
score(chosen) - score(rejected). Scores are cached per (scorer identity, row content) under the
cache's `scores/`, like reference log-probs: a changed row or scorer is scored again, nothing else.

    scorer = Scorer("builtin", identity, reward, cache / "scores")
    scores = score_rows(rows, scorer, "builtin:sft [train]")       # one float per row
    kept = select(scores, groups, settings, seed)                   # one bool per row
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.artifacts import write_json_atomic
from posttrain.data.curate import exact_key
from posttrain.data.formats import DataError

if TYPE_CHECKING:
    from posttrain.config import ScoreConfig
    from posttrain.data.mixture import Part

# rows scored per call of the scorer
BATCH = 256
# rows shown in the report: the lowest-scored kept and the highest-scored dropped
SHOWN = 3
HISTOGRAM_BINS = 10


@dataclass
class Scorer:
    """What scores a stage's rows: `score(prompts, replies)` -> one finite float per reply."""

    name: str
    # a hash of what decides its scores (a function's source, an rm stage's key, the checker's version)
    identity: str
    score: Callable[[Sequence[str], Sequence[str]], list[float]]
    cache_folder: Path
    # distinct rows scored, and distinct rows whose score the cache held
    computed: int = 0
    reused: int = 0


def text(turns: list[dict]) -> str:
    return "\n".join(m["content"] for m in turns)


def last_user_turn(turns: list[dict]) -> str:
    return next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")


def replies(row: dict) -> tuple[str, list[str]]:
    """The prompt text and the replies a row is scored on: one (SFT, unpaired) or chosen and rejected."""
    if "chosen" in row:
        return last_user_turn(row["prompt"]), [text(row["chosen"]), text(row["rejected"])]
    if "messages" in row:
        messages = row["messages"]
        cut = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return last_user_turn(messages[:cut]), [text(messages[cut:])]
    if "completion" in row:
        return last_user_turn(row["prompt"]), [text(row["completion"])]
    raise DataError("score: a prompt-only row has no reply to score")


def row_key(row: dict) -> str:
    return exact_key(row).hex()


def score_rows(rows: list[dict], scorer: Scorer, label: str) -> list[float]:
    """One score per row (a pair: its margin), read from the cache where it was scored before."""
    from tqdm.auto import tqdm

    path = scorer.cache_folder / f"{scorer.identity}.json"
    cached: dict[str, float] = _read_cache(path)
    keys = [row_key(row) for row in rows]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)  # a repeated row is scored once
    todo = [i for k, i in first.items() if k not in cached]
    scorer.computed += len(todo)
    scorer.reused += len(first) - len(todo)
    bar = tqdm(total=len(todo), desc=f"Scoring rows ({scorer.name})", unit="row", disable=not todo, leave=False)
    try:
        for start in range(0, len(todo), BATCH):
            batch = todo[start : start + BATCH]
            for i, value in zip(batch, _score_batch([rows[i] for i in batch], batch, scorer, label), strict=True):
                cached[keys[i]] = value
            bar.update(len(batch))
    finally:
        bar.close()
        if todo:  # what was scored is kept, even when a later batch failed or a stop came
            _write_cache(path, cached)
    return [cached[k] for k in keys]


def _score_batch(rows: list[dict], indices: list[int], scorer: Scorer, label: str) -> list[float]:
    prompts, texts, widths = [], [], []
    for i, row in zip(indices, rows, strict=True):
        try:
            prompt, answers = replies(row)
        except DataError as e:
            raise DataError(f"{label}: row {i}: {e}") from None
        prompts += [prompt] * len(answers)
        texts += answers
        widths.append(len(answers))
    try:
        values = scorer.score(prompts, texts)
    except Exception as failed:  # the first row it fails on, named
        for i, row in zip(indices, rows, strict=True):
            prompt, answers = replies(row)
            try:
                scorer.score([prompt] * len(answers), answers)
            except Exception as e:
                raise DataError(f"{label}: row {i}: score.by {scorer.name}: {_first_line(e)}") from None
        first, last = indices[0], indices[-1]
        raise DataError(f"{label}: rows {first}-{last}: score.by {scorer.name}: {_first_line(failed)}") from None
    out, at = [], 0
    for width in widths:
        out.append(values[at] if width == 1 else values[at] - values[at + 1])
        at += width
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_cache(path: Path) -> dict[str, float]:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _write_cache(path: Path, scores: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, scores)


# --- which rows stay ---------------------------------------------------------------------------


def select(scores: list[float], groups: list[str], settings: ScoreConfig, seed: int) -> list[bool]:
    """Which rows stay: those at or above `min_score`, then the `keep` best (a count, or a share of
    all rows); with `balance`, each group (source or task) keeps its share of the count. Ties are
    broken by a seeded draw, so a pass/fail scorer keeps a random sample of the passing rows."""
    n = len(scores)
    eligible = [i for i in range(n) if settings.min_score is None or scores[i] >= settings.min_score]
    rng = random.Random(seed)
    tiebreak = [rng.random() for _ in range(n)]
    ranked = sorted(eligible, key=lambda i: (-scores[i], tiebreak[i]))
    count = kept_count(settings.keep, n)
    if count is not None and settings.sample_from is not None:
        ranked = _drawn_from_best(ranked, groups, settings.sample_from, rng)
    if count is None or count >= len(ranked):
        chosen = ranked
    elif settings.balance == "none" and settings.length_bins == 1:
        chosen = ranked[:count]
    else:
        chosen = _balanced(ranked, groups, count)
    kept = [False] * n
    for i in chosen:
        kept[i] = True
    return kept


def kept_count(keep: float | None, rows: int) -> int | None:
    """`keep` as a row count: a share (0 < keep < 1) of `rows`, or a count; None: no cap."""
    if keep is None:
        return None
    return round(keep * rows) if keep < 1 else int(keep)


def _drawn_from_best(ranked: list[int], groups: list[str], share: float, rng: random.Random) -> list[int]:
    """`ranked` with each group's best `share` of rows first, in a seeded random order, then the rest
    as ranked (taken only where a group's quota outgrows its share)."""
    sizes = Counter(groups[i] for i in ranked)
    seen: Counter[str] = Counter()
    best, rest = [], []
    for i in ranked:
        seen[groups[i]] += 1
        (best if seen[groups[i]] <= math.ceil(share * sizes[groups[i]]) else rest).append(i)
    rng.shuffle(best)
    return best + rest


def length_bins(groups: list[str], lengths: list[int], bins: int) -> list[str]:
    """Each row's group refined by its length bin: `bins` bins of equal row counts within each group,
    shortest first (`group|0` ... `group|bins-1`)."""
    if bins == 1:
        return groups
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    refined = list(groups)
    for g, rows in members.items():
        for rank, i in enumerate(sorted(rows, key=lambda i: lengths[i])):
            refined[i] = f"{g}|{rank * bins // len(rows)}"
    return refined


def _balanced(ranked: list[int], groups: list[str], count: int) -> list[int]:
    """`count` rows, each group's quota in proportion to its size (largest remainders); a group
    with too few eligible rows keeps them all and the rest go to the best of the others."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    total = len(groups)
    exact = {g: count * size / total for g, size in sizes.items()}
    quota = {g: math.floor(share) for g, share in exact.items()}
    for g in sorted(exact, key=lambda g: exact[g] - quota[g], reverse=True)[: count - sum(quota.values())]:
        quota[g] += 1
    chosen, rest, taken = [], [], dict.fromkeys(sizes, 0)
    for i in ranked:
        if taken[groups[i]] < quota[groups[i]]:
            taken[groups[i]] += 1
            chosen.append(i)
        else:
            rest.append(i)
    return chosen + rest[: count - len(chosen)]


# --- what the report shows ---------------------------------------------------------------------


def score_report(
    scores: list[float], kept: list[bool], rows: list[dict], sources: list[str], settings: ScoreConfig
) -> dict[str, Any]:
    """The histogram of scores, kept share per source and task, and the rows nearest the cut."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    low, high = min(scores), max(scores)
    width = (high - low) / HISTOGRAM_BINS or 1.0
    bins = [0] * HISTOGRAM_BINS
    kept_bins = [0] * HISTOGRAM_BINS
    for value, keep in zip(scores, kept, strict=True):
        b = min(int((value - low) / width), HISTOGRAM_BINS - 1)
        bins[b] += 1
        kept_bins[b] += keep
    kept_rows = [i for i in order if kept[i]]
    dropped_rows = [i for i in order if not kept[i]]

    def shown(i: int) -> dict[str, Any]:
        prompt, answers = replies(rows[i])
        return {"score": round(scores[i], 4), "source": sources[i], "prompt": prompt[:200], "reply": answers[0][:200]}

    return {
        "by": settings.by,
        "keep": settings.keep,
        "min_score": settings.min_score,
        "balance": settings.balance,
        "length_bins": settings.length_bins,
        "sample_from": settings.sample_from,
        "scored": len(scores),
        "kept": sum(kept),
        "mean_score": round(sum(scores) / len(scores), 4),
        "mean_kept_score": round(sum(s for s, k in zip(scores, kept, strict=True) if k) / max(sum(kept), 1), 4),
        "histogram": {"low": low, "high": high, "rows": bins, "kept": kept_bins},
        "per_source": _shares(sources, kept),
        "per_task": _shares([str(row.get("task")) for row in rows], kept) if any("task" in r for r in rows) else {},
        "lowest_kept": [shown(i) for i in kept_rows[:SHOWN]],
        "highest_dropped": [shown(i) for i in dropped_rows[-SHOWN:][::-1]],
    }


def _shares(groups: list[str], kept: list[bool]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for g, keep in zip(groups, kept, strict=True):
        entry = out.setdefault(g, {"scored": 0, "kept": 0})
        entry["scored"] += 1
        entry["kept"] += keep
    return out


# --- a stage's sources -------------------------------------------------------------------------


def keep_best(parts: list[Part], settings: ScoreConfig, scorer: Scorer, seed: int) -> dict[str, Any]:
    """Score every part's train rows and keep the best in place (each part's `removed["low
    score"]` counts what it lost); the report's `score` section."""
    rows = [row for part in parts for row in part.train]
    sources = [part.label for part in parts for _ in part.train]
    if settings.balance == "task":
        for part in parts:
            for i, row in enumerate(part.train):
                if not row.get("task"):
                    raise DataError(f"{part.label}: row {i}: score.balance: task needs a 'task' field in every row")
    scores = [value for part in parts for value in score_rows(part.train, scorer, part.label)]
    if settings.balance == "task":
        groups = [str(row.get("task")) for row in rows]
    elif settings.balance == "source":
        groups = sources
    else:
        groups = ["all"] * len(rows)
    if settings.length_bins > 1:
        lengths = [len(prompt) + sum(map(len, answers)) for prompt, answers in map(replies, rows)]
        groups = length_bins(groups, lengths, settings.length_bins)
    kept = select(scores, groups, settings, seed)
    report = score_report(scores, kept, rows, sources, settings) if rows else {}
    report.update(computed=scorer.computed, from_cache=scorer.reused)
    at = 0
    for part in parts:
        n = len(part.train)
        part.train = [row for row, keep in zip(part.train, kept[at : at + n], strict=True) if keep]
        part.removed["low score"] = n - len(part.train)
        at += n
    return report
