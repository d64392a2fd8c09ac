"""Every row format, from files in the public datasets' own schemas, through TRL's tokenization
and collators to training batches; the trained positions are checked token by token against
the character spans of the replies in the rendered conversation."""

from __future__ import annotations

import json

import pytest

from posttrain import models
from posttrain.config import DataSource, ModelConfig
from posttrain.data.load import load_stage_data


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path, kind, **settings):
    return load_stage_data(DataSource(path=str(path), eval_fraction=0.0, **settings), kind, path.parent, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ModelConfig()
    source = models.base_model_source(cfg, tmp_path_factory.mktemp("cache"))
    return models.load_tokenizer(source, cfg), models.load_model(source, cfg)


def expected_mask(tokenizer, conversation: list[dict], reply_from: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and, independently of TRL, which of them are trained:
    SFT: each assistant reply and its turn's closing token; a preference or KTO completion
    (`reply_from`: the index of its first message): everything from the reply on."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    spans, cursor = [], 0
    for i, m in enumerate(conversation):
        start = text.index(m["content"], cursor)
        cursor = start + len(m["content"])
        if reply_from is not None and i == reply_from:
            spans.append((start, len(text)))
        elif reply_from is None and m["role"] == "assistant":
            spans.append((start, text.index("<|im_end|>", cursor) + len("<|im_end|>")))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < b and a < e for s, e in spans)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def sft_batch(tiny, dataset):
    from trl import SFTConfig, SFTTrainer

    tokenizer, model = tiny
    args = SFTConfig(output_dir="/tmp/unused", assistant_only_loss=True, use_cpu=True, report_to="none", max_length=256)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(len(dataset))]
    return trainer.data_collator(rows)


def check_sft_masks(tiny, data):
    tokenizer, _ = tiny
    batch = sft_batch(tiny, data.train)
    for i, row in enumerate(data.train):
        ids, mask = expected_mask(tokenizer, row["messages"])
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        trained = (batch["labels"][i, :n] != -100).int().tolist()
        assert trained == mask, f"row {i}: trained positions differ from the assistant replies"
        assert (batch["labels"][i, n:] == -100).all()  # padding is never trained


# --- SFT formats -------------------------------------------------------------------------------


def test_ultrachat_messages_multi_turn_trains_every_assistant_turn(tiny, tmp_path):
    rows = [
        {
            "prompt": "Name a fruit.",
            "prompt_id": "a1",
            "messages": [
                {"content": "Name a fruit.", "role": "user"},
                {"content": "A pear.", "role": "assistant"},
                {"content": "Another one?", "role": "user"},
                {"content": "A plum.", "role": "assistant"},
            ],
        },
        {
            "prompt": "Add 2 and 3.",
            "prompt_id": "a2",
            "messages": [{"content": "Add 2 and 3.", "role": "user"}, {"content": "5", "role": "assistant"}],
        },
    ]
    data = _load(_jsonl(tmp_path / "train_sft.jsonl", rows), "sft")
    assert data.report["sources"][0]["format"] == "messages"
    check_sft_masks(tiny, data)
    tokenizer, _ = tiny
    batch = sft_batch(tiny, data.train)
    trained = batch["input_ids"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(trained) == "A pear.<|im_end|>A plum.<|im_end|>"


def test_alpaca_with_and_without_input(tiny, tmp_path):
    rows = [
        {"instruction": "Reverse the letters.", "input": "abc", "output": "cba", "text": "ignored"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "text": "ignored"},
    ]
    data = _load(_jsonl(tmp_path / "alpaca_data.jsonl", rows), "sft")
    assert data.train[0]["messages"] == [
        {"role": "user", "content": "Reverse the letters.\n\nabc"},
        {"role": "assistant", "content": "cba"},
    ]
    assert data.train[1]["messages"][0]["content"] == "Say hi."
    check_sft_masks(tiny, data)


def test_sharegpt_with_system_and_two_turns(tiny, tmp_path):
    rows = [
        {
            "id": "x1",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Count: fig fig"},
                {"from": "gpt", "value": "2"},
                {"from": "human", "value": "And: kiwi"},
                {"from": "gpt", "value": "1"},
            ],
        }
    ]
    data = _load(_jsonl(tmp_path / "sharegpt.json", rows), "sft")
    assert [m["role"] for m in data.train[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    check_sft_masks(tiny, data)


def test_prompt_completion_strings_and_message_lists(tiny, tmp_path):
    rows = [
        {"prompt": "What is 1 + 1?", "completion": "2"},
        {
            "prompt": [{"role": "system", "content": "Math."}, {"role": "user", "content": "What is 2 + 2?"}],
            "completion": [{"role": "assistant", "content": "4"}],
        },
    ]
    from datasets import Dataset

    # mixed str/list columns cannot share one parquet file: one file per shape, as two sources
    Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "a.parquet"))
    _jsonl(tmp_path / "b.jsonl", rows[1:])
    for name in ("a.parquet", "b.jsonl"):
        data = _load(tmp_path / name, "sft")
        assert data.report["sources"][0]["format"] == "prompt_completion"
        check_sft_masks(tiny, data)


# --- preference formats ------------------------------------------------------------------------


def _conv(*turns):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def check_pair_masks(tiny, data, trainer_cls, config_cls, replies):
    """The completion positions of each sequence in the batch are exactly the reply and its end."""
    tokenizer, model = tiny
    args = config_cls(output_dir="/tmp/unused", use_cpu=True, report_to="none", max_length=256)
    kwargs = {"ref_model": None} if trainer_cls.__name__ == "DPOTrainer" else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=data.train, processing_class=tokenizer, **kwargs)
    rows = [trainer.train_dataset[i] for i in range(len(data.train))]
    batch = trainer.data_collator(rows)
    for i, (prompt, reply) in enumerate(replies):
        ids, mask = expected_mask(tokenizer, prompt + reply, reply_from=len(prompt))
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real].tolist() == ids
        assert batch["completion_mask"][i][real].tolist() == mask, f"sequence {i}: completion positions differ"
        assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]).startswith(reply[0]["content"])


def test_ultrafeedback_implicit_prompt_to_dpo_batch(tiny, tmp_path):
    from trl import DPOConfig, DPOTrainer

    rows = [
        {
            "prompt": "What is 3 + 4?",
            "prompt_id": "p1",
            "chosen": _conv("What is 3 + 4?", "7"),
            "rejected": _conv("What is 3 + 4?", "8"),
            "messages": _conv("What is 3 + 4?", "7"),
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        },
        {
            "prompt": "Sort: c a b",
            "prompt_id": "p2",
            "chosen": _conv("Hi", "Hello", "Sort: c a b", "a b c"),
            "rejected": _conv("Hi", "Hello", "Sort: c a b", "c b a"),
            "messages": _conv("Hi", "Hello", "Sort: c a b", "a b c"),
            "score_chosen": 8.0,
            "score_rejected": 1.0,
        },
    ]
    data = _load(_jsonl(tmp_path / "train_prefs.jsonl", rows), "preference")
    assert data.train[1]["prompt"] == _conv("Hi", "Hello", "Sort: c a b")
    assert data.train[1]["chosen"] == [{"role": "assistant", "content": "a b c"}]
    pairs = [(r["prompt"], r["chosen"]) for r in data.train] + [(r["prompt"], r["rejected"]) for r in data.train]
    check_pair_masks(tiny, data, DPOTrainer, DPOConfig, pairs)


def test_anthropic_hh_text_to_dpo_batch(tiny, tmp_path):
    from trl import DPOConfig, DPOTrainer

    shared = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 5 + 5?\n\nAssistant:"
    spell = "\n\nHuman: Spell cat backwards\n\nAssistant:"
    rows = [
        {"chosen": shared + " 10", "rejected": shared + " 11"},
        {"chosen": spell + " tac", "rejected": spell + " cat"},
    ]
    data = _load(_jsonl(tmp_path / "train.jsonl", rows), "preference")
    assert data.report["sources"][0]["format"] == "hh"
    assert data.train[0]["prompt"] == _conv("Hi there", "Hello!", "What is 5 + 5?")
    assert data.train[0]["chosen"] == [{"role": "assistant", "content": "10"}]
    assert data.train[0]["rejected"] == [{"role": "assistant", "content": "11"}]
    pairs = [(r["prompt"], r["chosen"]) for r in data.train] + [(r["prompt"], r["rejected"]) for r in data.train]
    check_pair_masks(tiny, data, DPOTrainer, DPOConfig, pairs)


def test_explicit_prompt_with_renamed_columns(tmp_path):
    rows = [{"question": f"q{i}", "response_a": "good", "response_b": "bad", "chosen": "stale"} for i in range(3)]
    f = _jsonl(tmp_path / "pairs.jsonl", rows)
    data = _load(f, "preference", columns={"prompt": "question", "chosen": "response_a", "rejected": "response_b"})
    assert data.train[0]["prompt"] == [{"role": "user", "content": "q0"}]
    assert data.train[0]["chosen"] == [{"role": "assistant", "content": "good"}]  # the mapped column wins


def test_kto_unpaired_rows_and_pairs_converted(tiny, tmp_path):
    from trl import KTOConfig, KTOTrainer

    rows = [
        {"prompt": _conv("What is 1 + 2?"), "completion": [{"role": "assistant", "content": "3"}], "label": True},
        {"prompt": _conv("What is 1 + 2?"), "completion": [{"role": "assistant", "content": "4"}], "label": False},
    ]
    data = _load(_jsonl(tmp_path / "kto.jsonl", rows), "unpaired")
    assert [r["label"] for r in data.train] == [True, False]
    check_pair_masks(tiny, data, KTOTrainer, KTOConfig, [(r["prompt"], r["completion"]) for r in data.train])

    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    converted = _load(pairs, "unpaired")
    assert [(r["completion"][0]["content"], r["label"]) for r in converted.train] == [("yes", True), ("no", False)]


def test_csv_reads_every_cell_as_text(tmp_path):
    (tmp_path / "kto.csv").write_text("prompt,completion,label\nWhat is 6 * 7?,42,true\nWhat is 6 * 7?,41,0\n")
    data = _load(tmp_path / "kto.csv", "unpaired")
    assert [(r["completion"][0]["content"], r["label"]) for r in data.train] == [("42", True), ("41", False)]


def test_hub_style_folder_with_compressed_jsonl_and_data_dir(tmp_path):
    """Anthropic/hh-rlhf's layout: <subset>/train.jsonl.gz."""
    import gzip

    folder = tmp_path / "hh-rlhf" / "harmless-base"
    folder.mkdir(parents=True)
    rows = [
        {"chosen": f"\n\nHuman: q{i}\n\nAssistant: a", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"} for i in range(4)
    ]
    with gzip.open(folder / "train.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    src = DataSource(path=str(tmp_path / "hh-rlhf"), data_dir="harmless-base", eval_fraction=0.25)
    data = load_stage_data(src, "preference", tmp_path, seed=0)
    assert (len(data.train), len(data.eval)) == (3, 1)
