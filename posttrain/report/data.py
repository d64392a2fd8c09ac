"""The data report of a run: per stage, each source's rows through curation and the mixture, and
the token-length distribution; printed, and saved as `data_report.json`, `data_report.md` and
`data_lengths.png` in the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.report.table import markdown_table


def format_report(stage: str, report: dict[str, Any]) -> str:
    """One stage's report as a markdown table (a column per filter that removed rows) and a line
    on token lengths."""
    filters = [f for f, count in report["removed"].items() if count]  # in curation's order
    header = ["source", "format", "loaded", "held out", *(f"- {f}" for f in filters), "kept", "used"]
    rows = [
        [s["source"], s["format"], s["loaded"], s["held_out"], *(s["removed"].get(f, 0) for f in filters),
         s["kept"], s["used"]]
        for s in report["sources"]
    ]  # fmt: skip
    train = f"{report['train_rows']} train rows"
    if report.get("mixed_rows", 0) > report["train_rows"]:
        train += f" (of {report['mixed_rows']}: what its max_steps read)"
    lines = [
        f"data for {stage}: {train}, {report['eval_rows']} held out, dedup {report['dedup']}",
        markdown_table(header, [[str(c) for c in row] for row in rows]),
    ]
    if tokens := report.get("tokens"):
        over = ""
        if tokens["max_length"] is not None:
            share = 100 * tokens["over_max_length_share"]
            action = "dropped" if report["overlong"] == "drop" else "truncated"
            over = f"; over max_length {tokens['max_length']}: {tokens['over_max_length']} ({share:.1f}%, {action})"
        sampled = f" (a sample of {tokens['sampled_rows']} rows)" if "sampled_rows" in tokens else ""
        lines.append(
            f"tokens per row{sampled}: min {tokens['min']}, mean {tokens['mean']}, p50 {tokens['p50']}, "
            f"p90 {tokens['p90']}, p99 {tokens['p99']}, max {tokens['max']}{over}"
        )
    return "\n".join(lines)


def plot_lengths(lengths: dict[str, list[int]], max_lengths: dict[str, int | None], out: Path) -> Path | None:
    """A histogram of token lengths per stage, with the stage's max_length marked."""
    lengths = {stage: values for stage, values in lengths.items() if values}
    if not lengths:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.2), squeeze=False)
    for ax, (stage, values) in zip(axes[0], lengths.items(), strict=True):
        ax.hist(values, bins=min(50, max(5, len(set(values)))), color="tab:blue", alpha=0.8)
        if (limit := max_lengths.get(stage)) is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", label=f"max_length {limit}")
            ax.legend(fontsize=8)
        ax.set_title(f"{stage}: tokens per row", fontsize=10)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
