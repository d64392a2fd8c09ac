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


def _columns(method_columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    columns = list(COLUMNS)
    for item in method_columns:
        if item not in columns:
            columns.append(item)
    return columns


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
    header = ["stage", "method", "status", *(title for _, title in columns)]
    rows = [
        [name, r["method"], r.get("status", "-"), *(_cell(r["metrics"].get(key)) for key, _ in columns)]
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
