"""The end-of-run table: one row per stage (base model first), the metrics side by side."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("exact_match", "exact_match"),
    ("response_loss", "response_loss"),
    ("train_loss", "train_loss"),
    ("train_runtime", "train_s"),
    ("win_rate_vs_parent", "win_rate"),
)


def _columns(method_columns: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Column title -> the metric keys it shows (an rm stage's `eval_accuracy` and DPO's
    `eval_rewards/accuracies` share `reward_acc`: each row has one of them)."""
    columns: dict[str, list[str]] = {}
    for key, title in [*COLUMNS, *method_columns]:
        keys = columns.setdefault(title, [])
        if key not in keys:
            keys.append(key)
    return columns


def _value(metrics: dict[str, Any], keys: list[str]) -> Any:
    return next((metrics[key] for key in keys if metrics.get(key) is not None), None)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def format_table(results: dict[str, dict], method_columns: list[tuple[str, str]]) -> str:
    """One row per stage: its method, status and metrics; `method_columns` are the (metric key,
    column name) pairs the chain's methods add (StageSpec.summary_metrics)."""
    columns = _columns(method_columns)
    header = ["stage", "method", "status", *columns]
    rows = [
        [name, r["method"], r.get("status", "-"), *(_cell(_value(r["metrics"], keys)) for keys in columns.values())]
        for name, r in results.items()
    ]
    return markdown_table(header, rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns, readable as plain text too."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_samples(samples: list[dict[str, str]]) -> str:
    """Held-out prompts with the reference and every stage's greedy reply, as a markdown table."""
    if not samples:
        return "No held-out prompts were evaluated.\n"
    header = list(samples[0])

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in header) + " |" for row in samples]
    return "\n".join(lines) + "\n"
