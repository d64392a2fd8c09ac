"""Curation by score (posttrain/data/score.py): the rules keep exactly the rows they should, balance
holds per source and task, scores are cached by row and scorer, and a bad scorer names the row."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError, ScoreConfig
from posttrain.data.formats import DataError
from posttrain.data.mixture import Part
from posttrain.data.score import Scorer, keep_best, kept_count, length_bins, score_rows, select
from posttrain.rewards import Reward, builtin_reward


def rule(**fields) -> ScoreConfig:
    return ScoreConfig(by="test", **fields)


def sft(prompt: str, reply: str, task: str | None = None) -> dict:
    row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
    return row if task is None else {**row, "task": task}


SCORES = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8]


def kept_rows(kept: list[bool]) -> list[int]:
    return [i for i, keep in enumerate(kept) if keep]


def test_keep_a_count_a_share_or_a_threshold_keeps_the_best_rows():
    groups = ["a"] * len(SCORES)
    assert kept_rows(select(SCORES, groups, rule(keep=3), seed=0)) == [0, 3, 5]
    assert kept_rows(select(SCORES, groups, rule(keep=0.5), seed=0)) == [0, 3, 5]
    assert kept_rows(select(SCORES, groups, rule(min_score=0.5), seed=0)) == [0, 2, 3, 5]
    # the threshold first, then the count among what passed it
    assert kept_rows(select(SCORES, groups, rule(keep=2, min_score=0.5), seed=0)) == [0, 5]
    assert kept_rows(select(SCORES, groups, rule(keep=5, min_score=0.6), seed=0)) == [0, 3, 5]
    assert kept_count(0.25, 8000) == 2000 and kept_count(1000, 8000) == 1000 and kept_count(None, 10) is None


def test_ties_are_broken_by_a_seeded_draw_not_by_row_order():
    passed = [1.0] * 50 + [0.0] * 50
    groups = ["a"] * 100
    first = kept_rows(select(passed, groups, rule(keep=10), seed=0))
    assert first == kept_rows(select(passed, groups, rule(keep=10), seed=0)), "reproducible"
    assert first != list(range(10)), "not the first rows"
    assert all(i < 50 for i in first), "only passing rows"
    assert first != kept_rows(select(passed, groups, rule(keep=10), seed=1))


def test_balance_keeps_each_groups_share_of_the_count():
    # task a holds 60% of the rows and the best scores; balanced, it keeps 60% of the count
    groups = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    scores = [1.0 - i / 1000 for i in range(60)] + [0.5 - i / 1000 for i in range(40)]
    unbalanced = select(scores, groups, rule(keep=20), seed=0)
    assert [groups[i] for i in kept_rows(unbalanced)] == ["a"] * 20
    balanced = select(scores, groups, rule(keep=20, balance="task"), seed=0)
    counts = {g: sum(1 for i in kept_rows(balanced) if groups[i] == g) for g in "abc"}
    assert counts == {"a": 12, "b": 6, "c": 2}
    assert kept_rows(balanced)[:12] == list(range(12)), "each group keeps its best rows"
    # a group with too few rows above the threshold keeps them; the count goes to the others' best
    low_c = scores[:90] + [-1.0] * 10
    short = select(low_c, groups, rule(keep=20, min_score=0.0, balance="task"), seed=0)
    counts = {g: sum(1 for i in kept_rows(short) if groups[i] == g) for g in "abc"}
    assert sum(counts.values()) == 20 and counts["c"] == 0 and counts["b"] == 6


def test_length_bins_keep_each_bins_share_so_the_kept_rows_span_the_lengths():
    # a scorer that favours long rows: unbinned, the 20 kept are the 20 longest
    lengths = list(range(100))
    scores = [length / 100 for length in lengths]
    groups = length_bins(["a"] * 100, lengths, 4)
    assert groups[:3] == ["a|0"] * 3 and groups[-1] == "a|3"
    assert kept_rows(select(scores, ["a"] * 100, rule(keep=20), seed=0)) == list(range(80, 100))
    # four bins of 25 rows: 5 from each, each bin's best (its longest)
    binned = kept_rows(select(scores, groups, rule(keep=20, length_bins=4), seed=0))
    assert binned == [*range(20, 25), *range(45, 50), *range(70, 75), *range(95, 100)]
    # within each group: two tasks, each split into its own bins
    tasks = ["x", "y"] * 50
    assert sorted(set(length_bins(tasks, lengths, 2))) == ["x|0", "x|1", "y|0", "y|1"]
    assert length_bins(tasks, lengths, 1) == tasks


def test_sample_from_draws_the_count_at_random_from_each_groups_best_share():
    scores = [i / 100 for i in range(100)]
    groups = ["a"] * 100
    drawn = kept_rows(select(scores, groups, rule(keep=10, sample_from=0.5), seed=0))
    assert len(drawn) == 10 and all(i >= 50 for i in drawn), "only from the better half"
    assert drawn != list(range(90, 100)), "not the very best"
    assert drawn == kept_rows(select(scores, groups, rule(keep=10, sample_from=0.5), seed=0)), "seeded"
    # per group: task b's better half, though all of a's rows score higher
    two = ["a"] * 50 + ["b"] * 50
    skewed = [1 + i / 100 for i in range(50)] + [i / 100 for i in range(50)]
    balanced = kept_rows(select(skewed, two, rule(keep=10, sample_from=0.5, balance="task"), seed=0))
    assert sum(i >= 50 for i in balanced) == 5 and all(i >= 75 or 25 <= i < 50 for i in balanced)


def test_keep_best_over_sources_reports_what_each_kept_and_balances_by_source(tmp_path):
    noisy = Part(None, "noisy.jsonl", "messages", [sft(f"What is {i} + 1?", str(i + 2), "add") for i in range(30)], [])
    clean = Part(None, "clean.jsonl", "messages", [sft(f"What is {i} + 2?", str(i + 2), "add") for i in range(10)], [])
    scorer = Scorer("builtin", "builtin-v1", Reward("builtin", builtin_reward), tmp_path)
    report = keep_best([noisy, clean], rule(keep=8, balance="source"), scorer, seed=0)
    # balanced by source: 3/4 of 8 from noisy (all wrong, score 0), 1/4 from clean (all right)
    assert len(noisy.train) == 6 and len(clean.train) == 2
    assert noisy.removed["low score"] == 24 and clean.removed["low score"] == 8
    assert report["per_source"] == {"noisy.jsonl": {"scored": 30, "kept": 6}, "clean.jsonl": {"scored": 10, "kept": 2}}
    assert report["per_task"] == {"add": {"scored": 40, "kept": 8}}
    assert report["histogram"]["rows"][0] == 30 and report["histogram"]["rows"][-1] == 10
    assert report["lowest_kept"][0]["score"] == 0.0 and report["highest_dropped"][0]["score"] == 1.0
    # unbalanced, the 8 best are clean rows
    again = [
        Part(None, "noisy.jsonl", "messages", [sft(f"What is {i} + 1?", str(i + 2)) for i in range(30)], []),
        Part(None, "clean.jsonl", "messages", [sft(f"What is {i} + 2?", str(i + 2)) for i in range(10)], []),
    ]
    keep_best(again, rule(keep=8), scorer, seed=0)
    assert len(again[0].train) == 0 and len(again[1].train) == 8


def test_a_pair_is_scored_on_its_margin(tmp_path):
    pair = {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    }
    swapped = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
    scorer = Scorer("builtin", "b", Reward("builtin", builtin_reward), tmp_path)
    assert score_rows([pair, swapped], scorer, "pairs.jsonl") == [1.0, -1.0]


def test_a_row_without_a_reply_cannot_be_scored(tmp_path):
    scorer = Scorer("builtin", "b", Reward("builtin", builtin_reward), tmp_path)
    with pytest.raises(DataError, match=r"^prompts.jsonl: row 0: score: a prompt-only row has no reply to score$"):
        score_rows([{"prompt": [{"role": "user", "content": "What is 1 + 1?"}]}], scorer, "prompts.jsonl")


class Counting:
    """A scorer that counts the replies it was asked to score: the reply's length."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, replies):
        self.calls += len(replies)
        return [float(len(r)) for r in replies]


def test_scores_are_cached_per_row_and_scorer(tmp_path):
    rows = [sft(f"q{i}", "x" * i) for i in range(5)]
    counting = Counting()
    scorer = Scorer("length", "length-v1", Reward("length", counting), tmp_path)
    assert score_rows(rows, scorer, "f") == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert counting.calls == 5
    assert score_rows(rows, scorer, "f") == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert counting.calls == 5, "every score read back from the cache"
    changed = rows[:4] + [sft("q4", "yy")]
    assert score_rows(changed, scorer, "f")[-1] == 2.0
    assert counting.calls == 6, "only the changed row is scored again"
    other = Scorer("length", "length-v2", Reward("length", counting), tmp_path)
    score_rows(rows, other, "f")
    assert counting.calls == 11, "another scorer identity scores every row"


def test_a_scorer_that_fails_or_returns_a_non_number_is_one_error_naming_the_row(tmp_path):
    rows = [sft("What is 1 + 1?", "2"), sft("What is 2 + 2?", "4"), sft("Tell me a joke", "no")]
    scorer = Scorer("builtin", "b", Reward("builtin", builtin_reward), tmp_path)
    with pytest.raises(DataError) as e:
        score_rows(rows, scorer, "jokes.jsonl")
    assert str(e.value).startswith("jokes.jsonl: row 2: score.by builtin: reward builtin: 'Tell me a joke' is not")

    def nan_for_no(prompts, replies):
        return [float("nan") if r == "no" else 1.0 for r in replies]

    with pytest.raises(DataError) as e:
        score_rows(rows, Scorer("my:nan", "n", Reward("my:nan", nan_for_no), tmp_path), "jokes.jsonl")
    expected = "jokes.jsonl: row 2: score.by my:nan: reward my:nan: score 0 is nan; expected a finite number"
    assert str(e.value) == expected
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"keep": 100}, "data.sft.score.by: is null: name the scorer"),
        ({"by": "builtin"}, "data.sft.score.keep: give keep or min_score (or both)"),
        ({"by": "builtin", "keep": 1.5}, "data.sft.score.keep: 1.5 is not a whole count"),
        ({"by": "builtin", "keep": 0}, "data.sft.score.keep: 0 must be a row count (>= 1) or a share in (0, 1)"),
        ({"by": "builtin", "keep": 10, "balance": "topic"}, "data.sft.score.balance: 'topic' is not one of none"),
        ({"by": "builtin", "keep": 10, "length_bins": 0}, "data.sft.score.length_bins: 0 must be 1 (none) or more"),
        ({"by": "builtin", "keep": 10, "sample_from": 1.5}, "data.sft.score.sample_from: 1.5 must be a share"),
        ({"by": "builtin", "min_score": 1, "sample_from": 0.5}, "data.sft.score.sample_from: draws keep rows"),
        ({"by": "builtin", "keep": 10, "model": "sft"}, "data.sft.score.model: 'sft' is read only by a likelihood"),
    ],
)
def test_score_settings_are_checked(fields, message):
    with pytest.raises(ConfigError) as e:
        ScoreConfig(**fields).validate("data.sft.score")
    assert str(e.value).startswith(message)
