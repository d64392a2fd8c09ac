"""The end-of-run tables (posttrain/report/table.py): one row per stage with the fixed columns and
those the methods add (each once), missing values as "-", numbers rounded by magnitude, padded
markdown columns, and the side-by-side samples with pipes and line breaks escaped."""

from __future__ import annotations

import pytest

from posttrain.report.table import COLUMNS, format_samples, format_table, markdown_table


def cells(line: str) -> list[str]:
    """The stripped cells of one markdown table line."""
    assert line.startswith("|") and line.endswith("|")
    return [c.strip() for c in line[1:-1].split("|")]


def as_rows(table: str) -> list[dict[str, str]]:
    header, rule, *rows = table.splitlines()
    assert set(rule) <= {"|", "-"}
    return [dict(zip(cells(header), cells(row), strict=True)) for row in rows]


RESULTS = {
    "base": {"method": "base", "status": "base", "metrics": {"exact_match": 0.125, "response_loss": 2.5}},
    "sft": {
        "method": "sft",
        "status": "trained",
        "metrics": {"exact_match": 0.5, "train_loss": 1.25, "train_runtime": 12.34, "response_loss": 0.75},
    },
    "align": {
        "method": "dpo",
        "status": "reused",
        "metrics": {"exact_match": 0.625, "eval_rewards/accuracies": 0.875, "train_runtime": 345.6},
    },
}
DPO_COLUMNS = [("eval_rewards/accuracies", "reward_acc"), ("eval_rewards/margins", "margin")]


def test_one_row_per_stage_in_order_with_method_and_status():
    rows = as_rows(format_table(RESULTS, DPO_COLUMNS))
    assert [(r["stage"], r["method"], r["status"]) for r in rows] == [
        ("base", "base", "base"),
        ("sft", "sft", "trained"),
        ("align", "dpo", "reused"),
    ]


def test_the_fixed_columns_come_first_then_each_method_column_once():
    header = cells(format_table(RESULTS, [*DPO_COLUMNS, *DPO_COLUMNS, ("train_loss", "train_loss")]).splitlines()[0])
    fixed = [title for _, title in COLUMNS]
    assert header == ["stage", "method", "status", *fixed, "reward_acc", "margin"]


def test_missing_metrics_and_status_show_as_a_dash():
    results = {"sft": {"method": "sft", "metrics": {"exact_match": None}}}
    (row,) = as_rows(format_table(results, DPO_COLUMNS))
    assert row["status"] == "-" and row["exact_match"] == "-" and row["margin"] == "-"
    rows = as_rows(format_table(RESULTS, DPO_COLUMNS))
    assert rows[0]["train_loss"] == "-" and rows[1]["reward_acc"] == "-"


def test_numbers_are_rounded_by_magnitude():
    rows = as_rows(format_table(RESULTS, DPO_COLUMNS))
    assert rows[0]["exact_match"] == "0.125" and rows[0]["response_loss"] == "2.500"
    assert rows[1]["train_s"] == "12.3"  # 10 <= x < 100: one decimal
    assert rows[2]["train_s"] == "346"  # >= 100: none
    assert rows[2]["reward_acc"] == "0.875"


@pytest.mark.parametrize(
    "value, shown",
    [(0.0, "0.000"), (9.9994, "9.999"), (-5.5, "-5.500"), (10.0, "10.0"), (-42.26, "-42.3"), (100.0, "100"), (7, "7")],
)
def test_cell_formatting(value, shown):
    (row,) = as_rows(format_table({"s": {"method": "sft", "metrics": {"train_loss": value}}}, []))
    assert row["train_loss"] == shown


def test_markdown_table_pads_every_column_to_its_widest_cell():
    table = markdown_table(["a", "long header"], [["wide cell", "x"], ["b", 3]])
    assert table.splitlines() == [
        "| a         | long header |",
        "|-----------|-------------|",
        "| wide cell | x           |",
        "| b         | 3           |",
    ]


def test_markdown_table_lines_have_equal_length():
    lines = format_table(RESULTS, DPO_COLUMNS).splitlines()
    assert len({len(line) for line in lines}) == 1
    positions = [[i for i, ch in enumerate(line) if ch == "|"] for line in lines]
    assert all(p == positions[0] for p in positions)  # the separators line up


def test_markdown_table_rejects_rows_of_the_wrong_width():
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["1", "2", "3"]])


def test_samples_are_a_table_of_prompt_reference_and_replies():
    samples = [
        {"prompt": "What is 2+2?", "reference": "4", "base": "5", "sft": "4"},
        {"prompt": "What is 3+3?", "reference": "6", "base": "6"},  # sft gave no reply
    ]
    assert format_samples(samples).splitlines() == [
        "| prompt | reference | base | sft |",
        "|---|---|---|---|",
        "| What is 2+2? | 4 | 5 | 4 |",
        "| What is 3+3? | 6 | 6 |  |",
    ]
    assert format_samples(samples).endswith("|\n")


def test_samples_escape_pipes_and_newlines():
    text = format_samples([{"prompt": "a | b\nc", "reference": "x|y", "sft": 3}])
    row = text.splitlines()[2]
    assert row == "| a \\| b<br>c | x\\|y | 3 |"


def test_no_samples_is_a_sentence():
    assert format_samples([]) == "No held-out prompts were evaluated.\n"


def test_methods_that_name_a_metric_alike_share_one_column():
    """An rm stage's eval_accuracy and DPO's eval_rewards/accuracies are both reward_acc: one column."""
    results = {
        "rm": {"method": "rm", "status": "trained", "metrics": {"eval_accuracy": 0.69}},
        "align": {"method": "dpo", "status": "trained", "metrics": {"eval_rewards/accuracies": 0.91}},
    }
    table = format_table(results, [("eval_accuracy", "reward_acc"), ("eval_rewards/accuracies", "reward_acc")])
    header, _, rm, align = table.splitlines()
    assert header.count("reward_acc") == 1
    assert rm.rstrip(" |").endswith("0.690") and align.rstrip(" |").endswith("0.910")
