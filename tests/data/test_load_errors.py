"""Bad data gives one line naming the file, row and field and what was expected, while validating."""

from __future__ import annotations

import json

import pytest

from posttrain.config import DataSource, SourceConfig
from posttrain.data.load import DataError, load_stage_data
from tests.conftest import FAST, run_posttrain


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conv(user="q", reply="a"):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


GOOD = [{"messages": _conv(f"q{i}", f"a{i}")} for i in range(4)]


def _error(tmp_path, kind="sft", **settings) -> str:
    with pytest.raises(DataError) as e:
        load_stage_data(DataSource(eval_fraction=0.0, **settings), kind, tmp_path, seed=0)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_malformed_json_line_names_the_line(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n" + '{"messages": [}\n')
    assert _error(tmp_path, path=str(f)) == f"{f} line 4: not valid JSON (Expecting value at column 15)"


def test_misspelled_column_is_named_with_a_suggestion(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosne": "a", "rejected": "b"}])
    message = _error(tmp_path, kind="preference", path=str(f))
    assert message.startswith(f"{f}: a preference stage needs the columns of one of: preference (chosen, rejected)")
    assert "found: prompt, chosne, rejected (did you mean 'chosne' for 'chosen'?)" in message


def test_sft_rows_given_to_a_preference_stage(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", GOOD)
    assert "these rows look like messages rows, which a preference stage cannot train on" in _error(
        tmp_path, kind="preference", path=str(f)
    )


def test_column_mapping_to_a_missing_column(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "a": "x", "b": "y"}])
    message = _error(tmp_path, kind="preference", path=str(f), columns={"chosen": "response_a", "rejected": "b"})
    assert message == f"{f}: columns.chosen: no column 'response_a'; found: prompt, a, b"


def test_explicit_format_with_missing_column(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "outptu": "a"}])
    message = _error(tmp_path, path=str(f), format="alpaca")
    assert (
        message
        == f"{f}: format alpaca: no column 'output'; found: instruction, outptu (did you mean 'outptu' for 'output'?)"
    )


@pytest.mark.parametrize(
    "row, field_and_problem",
    [
        (
            {"messages": [{"role": "human", "content": "q"}]},
            "messages[0].role: 'human'; allowed: system, user, assistant, tool",
        ),
        (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]},
            "messages[0].role: the conversation starts with an assistant turn; it must start with user",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "messages[1].role: a second user turn in a row; user and assistant turns must alternate",
        ),
        (
            {"messages": [*_conv(), {"role": "user", "content": "more?"}]},
            "messages[2].role: 'user'; this must end with an assistant turn",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages: has no assistant turn to learn from"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages[1].role: a system message may only come first",
        ),
        (
            {"messages": [{"role": "user", "content": ["q", "image"]}, {"role": "assistant", "content": "a"}]},
            "messages[0].content: expected a string, got list",
        ),
        (
            {"messages": [{"role": "user", "text": "q"}]},
            "messages[0]: expected {'role': ..., 'content': ...}, got {'role': 'user', 'text': 'q'}",
        ),
        ({"messages": "q"}, "messages: expected a non-empty list of messages, got str"),
    ],
)
def test_bad_conversation_names_line_and_field(tmp_path, row, field_and_problem):
    f = _jsonl(tmp_path / "chat.jsonl", [*GOOD, row])
    assert _error(tmp_path, path=str(f)) == f"{f} line 5: {field_and_problem}"


def test_non_string_content_among_strings_in_one_file(tmp_path):
    bad = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}
    f = _jsonl(tmp_path / "chat.jsonl", [*GOOD, bad])
    assert _error(tmp_path, path=str(f)) == f"{f} line 5: messages[0].content: expected a string, got int"


@pytest.mark.parametrize(
    "row, kind, field_and_problem",
    [
        (
            {"chosen": "a", "rejected": "b"},
            "preference",
            "prompt: missing: 'chosen' is a bare reply, so the row needs a prompt",
        ),
        (
            {"prompt": "q", "chosen": 3, "rejected": "b"},
            "preference",
            "chosen: expected a string or a list of messages, got int",
        ),
        (
            {"chosen": "Human: hi\n\nAssistant: a", "rejected": "hi"},
            "preference",
            "rejected: expected text starting with '\\n\\nHuman: ', got 'hi'",
        ),
        (
            {"chosen": _conv("x", "a"), "rejected": _conv("y", "b")},
            "preference",
            "chosen: chosen and rejected share no prompt (no common turns ending with a user turn)",
        ),
        (
            {"prompt": "q", "completion": "a", "label": "maybe"},
            "unpaired",
            "label: expected true (desirable) or false (undesirable), got 'maybe'",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            "sft",
            "conversations[1].from: 'bot'; allowed: human, user, gpt",
        ),
    ],
)
def test_bad_pair_and_other_formats(tmp_path, row, kind, field_and_problem):
    f = _jsonl(tmp_path / "rows.jsonl", [row])
    assert _error(tmp_path, kind=kind, path=str(f)).startswith(f"{f} line 1: {field_and_problem}")


def test_parquet_rows_are_named_by_index(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": ""}, {"prompt": None, "completion": "c"}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    message = _error(tmp_path, path=str(tmp_path / "d.parquet"))
    assert (
        message
        == f"{tmp_path / 'd.parquet'} row 2 (0-based): prompt: expected a string or a list of messages, got null"
    )


def test_empty_after_curation_says_what_removed_the_rows(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3)
    message = _error(tmp_path, kind="preference", path=str(f))
    assert message == f"{f}: no train rows left after curation (removed: chosen = rejected 3)"


def test_mixture_errors(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", GOOD)
    sources = [SourceConfig(path=str(a), rows=2), SourceConfig(path=str(a), weight=1.0)]
    message = _error(tmp_path, path=None, sources=sources, max_rows=2)
    assert message == "max_rows=2 leaves no room for the weighted sources after 2 fixed rows"


def test_bad_data_stops_the_run_before_any_model_is_loaded(tmp_path, cache_dir):
    f = _jsonl(
        tmp_path / "chat.jsonl",
        [*GOOD, {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}],
    )
    out = tmp_path / "run"
    result = run_posttrain(*FAST, f"data.sft.path={f}", f"run.output_dir={out}", cache_dir=cache_dir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: sft.data: {f} line 5: messages[1].role: 'bot'; allowed: system, user, assistant, tool"
    )
    assert "evaluating base model" not in result.stdout and not (out / "sft").exists()


def test_a_line_cut_short_in_the_middle_of_a_file_is_named_when_the_stage_loads(tmp_path):
    """datasets reads the file in blocks and reports a byte position; the loader names the line."""
    f = tmp_path / "chat.jsonl"
    cut_short = '{"messages": [{"role": "us\n'
    f.write_text("".join(json.dumps(r) + "\n" for r in GOOD * 50) + cut_short + json.dumps(GOOD[0]))
    assert _error(tmp_path, path=str(f)) == f"{f} line 201: not valid JSON (Unterminated string starting at column 24)"


def test_an_empty_file_is_one_line_when_the_stage_loads(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text("")
    assert _error(tmp_path, path=str(f)) == f"{f}: is empty (no rows)"
