"""Loading stage data from files in the formats users have, and errors that name the row."""

from __future__ import annotations

import json

import pytest

from posttrain.config import DataSource
from posttrain.data.formats import split_conversations
from posttrain.data.load import DataError, load_stage_data


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conv(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_local_jsonl_messages_with_held_out_fraction(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": _conv(f"q{i}", f"a{i}"), "id": i} for i in range(40)])
    data = load_stage_data(DataSource(path=str(f), eval_fraction=0.25), "sft", tmp_path, seed=0)
    assert len(data.train) == 30 and len(data.eval) == 10
    assert data.train.column_names == ["messages"]
    held_out = {r["messages"][0]["content"] for r in data.eval}
    assert not held_out & {r["messages"][0]["content"] for r in data.train}


def test_folder_with_named_splits_like_a_hub_dataset(tmp_path):
    folder = tmp_path / "ultrachat"
    folder.mkdir()
    _jsonl(folder / "train_sft.jsonl", [{"prompt": "x", "messages": _conv(f"q{i}", "a")} for i in range(6)])
    _jsonl(folder / "test_sft.jsonl", [{"prompt": "y", "messages": _conv(f"t{i}", "a2")} for i in range(3)])
    src = DataSource(path=str(folder), split="train_sft", eval_split="test_sft")
    data = load_stage_data(src, "sft", tmp_path, seed=0)
    assert (len(data.train), len(data.eval)) == (6, 3)


HUB_README = """---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
  - split: test_prefs
    path: data/test_prefs-*
---
"""


def test_local_copy_of_a_hub_dataset_in_its_exact_layout(tmp_path):
    """ultrafeedback_binarized as the hub stores it: README configs + data/<split>-xxxxx-of-xxxxx.parquet."""
    from datasets import Dataset

    folder = tmp_path / "ultrafeedback_binarized"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(HUB_README)
    for split, n in (("train_prefs", 8), ("test_prefs", 2)):
        rows = [
            {"prompt": f"{split}{i}", "chosen": _conv(f"{split}{i}", "good"), "rejected": _conv(f"{split}{i}", "bad")}
            for i in range(n)
        ]
        Dataset.from_list(rows).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    src = DataSource(path=str(folder), split="train_prefs", eval_split="test_prefs")
    data = load_stage_data(src, "preference", tmp_path, seed=0)
    assert (len(data.train), len(data.eval)) == (8, 2)
    assert data.train[0]["chosen"] == [{"role": "assistant", "content": "good"}]


def test_parquet_and_csv_prompt_completion(tmp_path):
    from datasets import Dataset

    rows = {"prompt": ["a", "b", "c", "d"], "completion": ["1", "2", "3", "4"]}
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_dict(rows).to_csv(str(tmp_path / "d.csv"))
    for name in ("d.parquet", "d.csv"):
        data = load_stage_data(DataSource(path=str(tmp_path / name), eval_fraction=0.0), "sft", tmp_path, seed=0)
        assert data.train.column_names == ["messages"] and len(data.train) == 4
        assert data.train[0]["messages"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}]


def test_implicit_prompt_preferences_like_ultrafeedback(tmp_path):
    row = {
        "prompt": "What is 2+2?",
        "chosen": _conv("What is 2+2?", "4"),
        "rejected": _conv("What is 2+2?", "5"),
        "score_chosen": 9.0,
    }
    f = _jsonl(tmp_path / "prefs.jsonl", [row] * 4)
    data = load_stage_data(DataSource(path=str(f), eval_fraction=0.0), "preference", tmp_path, seed=0)
    first = data.train[0]
    assert first["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert first["chosen"] == [{"role": "assistant", "content": "4"}]
    assert first["rejected"] == [{"role": "assistant", "content": "5"}]


def test_explicit_string_preferences(tmp_path):
    f = _jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"Hi {i}", "chosen": "Hello", "rejected": "Go away"} for i in range(2)]
    )
    data = load_stage_data(DataSource(path=str(f), eval_fraction=0.0), "preference", tmp_path, seed=0)
    assert data.train[0]["prompt"] == [{"role": "user", "content": "Hi 0"}]
    assert data.train[0]["chosen"] == [{"role": "assistant", "content": "Hello"}]


def test_split_conversations_keeps_multi_turn_prefix():
    prefix = _conv("a", "b") + [{"role": "user", "content": "c"}]
    prompt, chosen, rejected = split_conversations(
        prefix + [{"role": "assistant", "content": "good"}], prefix + [{"role": "assistant", "content": "bad"}]
    )
    assert prompt == prefix and chosen[0]["content"] == "good" and rejected[0]["content"] == "bad"


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("hello")
    with pytest.raises(
        DataError, match=r"unsupported file type '.txt'; allowed: .json, .jsonl, .parquet, .csv \(also gzipped\)"
    ):
        load_stage_data(DataSource(path=str(f)), "sft", tmp_path, seed=0)


def test_missing_hub_dataset_offline_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_stage_data(DataSource(path="nobody/no-such-dataset"), "sft", tmp_path, seed=0)
    assert "nobody/no-such-dataset: could not load" in str(e.value) and "\n" not in str(e.value)


def test_max_rows_caps_deterministically(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": _conv(f"q{i}", "a")} for i in range(50)])
    src = DataSource(path=str(f), eval_fraction=0.0, max_rows=10)
    a = load_stage_data(src, "sft", tmp_path, seed=3).train
    b = load_stage_data(src, "sft", tmp_path, seed=3).train
    assert len(a) == 10 and a["messages"] == b["messages"]


def test_folder_of_plain_files_is_one_train_split_and_errors_name_the_file(tmp_path):
    folder = tmp_path / "chats"
    (folder / "more").mkdir(parents=True)
    _jsonl(folder / "a.jsonl", [{"messages": _conv(f"a{i}", "x")} for i in range(5)])
    bad = [{"messages": _conv(f"b{i}", "x")} for i in range(3)] + [{"messages": [{"role": "bot", "content": "q"}]}]
    _jsonl(folder / "more" / "b.jsonl", bad[:3])
    data = load_stage_data(DataSource(path=str(folder), eval_fraction=0.0), "sft", tmp_path, seed=0)
    assert len(data.train) == 8
    _jsonl(folder / "more" / "b.jsonl", bad)
    with pytest.raises(DataError, match=rf"^{folder / 'more' / 'b.jsonl'} line 4: messages\[0\].role: 'bot'"):
        load_stage_data(DataSource(path=str(folder), eval_fraction=0.0), "sft", tmp_path, seed=0)
    (folder / "c.csv").write_text("prompt,completion\nq,a\n")
    with pytest.raises(DataError, match="holds csv and json files; keep one type per folder"):
        load_stage_data(DataSource(path=str(folder), eval_fraction=0.0), "sft", tmp_path, seed=0)
