"""Curation filters and their report, held-out splits, and mixtures that honour weights and counts."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from posttrain import models
from posttrain.config import DataSource, ModelConfig, SourceConfig
from posttrain.data.load import load_stage_data


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conv(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _load(tmp_path, kind="sft", tokenizer=None, max_length=None, **settings):
    settings.setdefault("eval_fraction", 0.0)
    return load_stage_data(DataSource(**settings), kind, tmp_path, 0, tokenizer, max_length)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cfg = ModelConfig()
    return models.load_tokenizer(models.base_model_source(cfg, tmp_path_factory.mktemp("cache")), cfg)


def test_exact_and_normalized_dedup(tmp_path):
    rows = [
        {"messages": _conv("What is 2+2?", "4")},
        {"messages": _conv("What is 2+2?", "4")},  # exact duplicate
        {"messages": _conv("what is 2 + 2", "4.")},  # same ignoring case, spaces, punctuation
        {"messages": _conv("What is 3+3?", "6")},
    ]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    exact = _load(tmp_path, path=str(f), dedup="exact")
    normalized = _load(tmp_path, path=str(f), dedup="normalized")
    none = _load(tmp_path, path=str(f), dedup="none")
    assert (len(exact.train), len(normalized.train), len(none.train)) == (3, 2, 4)
    assert exact.report["removed"]["duplicate"] == 1 and normalized.report["removed"]["duplicate"] == 2
    assert normalized.train[0]["messages"] == rows[0]["messages"]  # the first one is kept


def test_duplicates_across_sources_keep_the_first_source(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"messages": _conv(f"q{i}", "a")} for i in range(4)])
    b = _jsonl(tmp_path / "b.jsonl", [{"messages": _conv(f"q{i}", "a")} for i in range(2, 6)])
    data = _load(tmp_path, path=None, sources=[SourceConfig(path=str(a)), SourceConfig(path=str(b))])
    removed = [s["removed"]["duplicate"] for s in data.report["sources"]]
    assert removed == [0, 2] and len(data.train) == 6


def test_empty_turns_and_identical_pairs_are_dropped_and_counted(tmp_path):
    rows = [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
        {"prompt": "q3", "chosen": "  ", "rejected": "bad"},
        {"prompt": "", "chosen": "good", "rejected": "bad"},
    ]
    data = _load(tmp_path, "preference", path=str(_jsonl(tmp_path / "p.jsonl", rows)))
    assert len(data.train) == 1
    assert data.report["removed"] == {
        "empty turn": 2, "chosen = rejected": 1, "duplicate": 0, "in held-out": 0, "too short": 0, "too long": 0,
        "low score": 0,
    }  # fmt: skip


def test_train_rows_identical_to_held_out_rows_are_dropped(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"messages": _conv(f"q{i}", "a")} for i in range(6)])
    _jsonl(folder / "test.jsonl", [{"messages": _conv(f"q{i}", "a")} for i in range(2)])
    data = _load(tmp_path, path=str(folder), eval_split="test")
    assert (len(data.train), len(data.eval), data.report["removed"]["in held-out"]) == (4, 2, 2)
    kept = _load(tmp_path, path=str(folder), eval_split="test", drop_held_out_overlap=False)
    assert len(kept.train) == 6


def test_held_out_fraction_never_splits_a_prompt(tmp_path):
    rows = [{"prompt": f"q{i // 3}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(30)]
    data = _load(tmp_path, "preference", path=str(_jsonl(tmp_path / "p.jsonl", rows)), eval_fraction=0.2)
    train_prompts = {r["prompt"][0]["content"] for r in data.train}
    held_prompts = {r["prompt"][0]["content"] for r in data.eval}
    assert len(data.eval) == 6 and not train_prompts & held_prompts


def test_token_lengths_filters_and_report(tmp_path, tokenizer):
    rows = [{"messages": _conv(f"q{i}", "word " * n)} for i, n in enumerate([1, 2, 3, 40, 80])]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    truncate = _load(tmp_path, tokenizer=tokenizer, max_length=60, path=str(f))
    tokens = truncate.report["tokens"]
    lengths = [
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows
    ]
    assert (tokens["min"], tokens["max"]) == (min(lengths), max(lengths))
    assert tokens["over_max_length"] == sum(n > 60 for n in lengths) == 2 and len(truncate.train) == 5
    dropped = _load(tmp_path, tokenizer=tokenizer, max_length=60, path=str(f), overlong="drop", min_tokens=lengths[1])
    assert dropped.report["removed"]["too long"] == 2 and dropped.report["removed"]["too short"] == 1
    assert [len(r["messages"][1]["content"].split()) for r in dropped.train] == [2, 3]


def test_weights_set_each_sources_share(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"messages": _conv(f"a{i}", "x"), "task": "a"} for i in range(100)])
    b = _jsonl(tmp_path / "b.jsonl", [{"messages": _conv(f"b{i}", "y"), "task": "b"} for i in range(100)])
    sources = [SourceConfig(path=str(a), weight=3.0), SourceConfig(path=str(b), weight=1.0)]
    data = _load(tmp_path, path=None, sources=sources, max_rows=80)
    assert Counter(data.train["task"]) == {"a": 60, "b": 20}
    assert len({r[0]["content"] for r in data.train["messages"]}) == 80  # sampled without repeats
    # without max_rows the mixture keeps the weighted sources' size: b's share is 50 of its 100 rows
    data = _load(
        tmp_path, path=None, sources=[SourceConfig(path=str(a), weight=1.0), SourceConfig(path=str(b), weight=1.0)]
    )
    assert Counter(data.train["task"]) == {"a": 100, "b": 100}
    shares = _load(
        tmp_path, path=None, sources=[SourceConfig(path=str(a), weight=4.0), SourceConfig(path=str(b), weight=1.0)]
    )
    assert Counter(shares.train["task"]) == {"a": 160, "b": 40}  # a repeated: 100 rows + 60 sampled again
    assert shares.report["sources"][0]["used"] == 160


def test_row_counts_upsample_and_mixtures_are_deterministic_and_shuffled(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"messages": _conv(f"a{i}", "x"), "task": "a"} for i in range(10)])
    b = _jsonl(tmp_path / "b.jsonl", [{"messages": _conv(f"b{i}", "y"), "task": "b"} for i in range(50)])
    sources = [SourceConfig(path=str(a), rows=25), SourceConfig(path=str(b))]
    first = _load(tmp_path, path=None, sources=sources)
    again = _load(tmp_path, path=None, sources=sources)
    assert Counter(first.train["task"]) == {"a": 25, "b": 50}
    counts = Counter(
        r[0]["content"] for r, t in zip(first.train["messages"], first.train["task"], strict=True) if t == "a"
    )
    assert set(counts.values()) == {2, 3}  # every a row twice, 5 of them a third time
    assert first.train["messages"] == again.train["messages"]
    assert first.train["task"][:25] != ["a"] * 25  # shuffled, not a then b
    other_seed = load_stage_data(DataSource(path=None, sources=sources, eval_fraction=0.0), "sft", tmp_path, seed=1)
    assert other_seed.train["messages"] != first.train["messages"]


def test_without_length_filters_token_stats_come_from_a_sample(tmp_path, tokenizer, monkeypatch):
    from posttrain.data import curate

    monkeypatch.setattr(curate, "SAMPLE", 20)
    rows = [{"messages": _conv(f"q{i}", "word " * (1 if i % 2 else 80))} for i in range(100)]
    data = _load(tmp_path, tokenizer=tokenizer, max_length=60, path=str(_jsonl(tmp_path / "d.jsonl", rows)))
    tokens = data.report["tokens"]
    assert tokens["sampled_rows"] == 20 and len(data.train) == 100
    assert 0.2 < tokens["over_max_length_share"] < 0.8  # half the rows are long
    assert tokens["over_max_length"] == round(tokens["over_max_length_share"] * 100)
