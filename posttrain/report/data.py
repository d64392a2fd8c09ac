"""The data report of a run: per stage, each source's rows through curation and the mixture, the
token-length distribution and, with curation by score, what was kept and dropped; printed, and
saved as `data_report.json`, `data_report.md`, `data_lengths.png` and `data_scores.png` in the
run folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    if scored := report.get("score"):
        lines.append(format_scores(scored))
    return "\n".join(lines)


def format_scores(scored: dict[str, Any]) -> str:
    """Curation by score: the rule, the kept share per source and task, the histogram, and the
    lowest-scored kept rows beside the highest-scored dropped ones."""
    rule = ", ".join(f"{k} {scored[k]:g}" for k in ("keep", "min_score") if scored[k] is not None)
    rule += f", balance {scored['balance']}"
    if scored.get("length_bins", 1) > 1:
        rule += f", {scored['length_bins']} length bins"
    if scored.get("sample_from") is not None:
        rule += f", drawn from the best {scored['sample_from']:g}"
    lines = [
        f"scored by {scored['by']}: kept {scored['kept']} of {scored['scored']} rows ({rule}); "
        f"mean score {scored['mean_score']}, kept {scored['mean_kept_score']}; "
        f"{scored['computed']} distinct rows scored, {scored['from_cache']} read from the cache"
    ]
    groups = [("source", name, g) for name, g in scored["per_source"].items()]
    groups += [("task", name, g) for name, g in scored["per_task"].items()]
    shares = [
        [kind, name, str(g["scored"]), str(g["kept"]), f"{g['kept'] / g['scored']:.1%}"] for kind, name, g in groups
    ]
    lines.append(markdown_table(["group", "", "scored", "kept", "kept share"], shares))
    hist = scored["histogram"]
    width = (hist["high"] - hist["low"]) / len(hist["rows"])
    edges = [f"{hist['low'] + i * width:.3g}" for i in range(len(hist["rows"]))]
    lines.append(
        markdown_table(["score from", *edges], [["rows", *map(str, hist["rows"])], ["kept", *map(str, hist["kept"])]])
    )
    near = [[f"kept {r['score']}", r["source"], r["prompt"], r["reply"]] for r in scored["lowest_kept"]] + [
        [f"dropped {r['score']}", r["source"], r["prompt"], r["reply"]] for r in scored["highest_dropped"]
    ]
    if near:
        cells = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in near]
        lines.append(markdown_table(["nearest the cut", "source", "prompt", "reply"], cells))
    return "\n".join(lines)


def plot_scores(scored: dict[str, dict[str, Any]], out: Path) -> Path | None:
    """Per stage scored, the histogram of scores: kept rows stacked on dropped ones."""
    scored = {stage: s for stage, s in scored.items() if s}
    if not scored:
        return None
    with _stage_panels(len(scored), out) as axes:
        for ax, (stage, s) in zip(axes, scored.items(), strict=True):
            hist = s["histogram"]
            n = len(hist["rows"])
            width = (hist["high"] - hist["low"]) / n or 1.0
            starts = [hist["low"] + i * width for i in range(n)]
            dropped = [r - k for r, k in zip(hist["rows"], hist["kept"], strict=True)]
            ax.bar(starts, hist["kept"], width=width, align="edge", color="tab:green", label="kept")
            ax.bar(starts, dropped, width=width, align="edge", bottom=hist["kept"], color="tab:gray", label="dropped")
            ax.set_title(f"{stage}: scored by {s['by']}", fontsize=10)
            ax.set_xlabel("score")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    return out


@contextlib.contextmanager
def _stage_panels(count: int, out: Path) -> Iterator[list]:
    """One panel per stage side by side, saved to `out` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.2), squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)


def plot_lengths(lengths: dict[str, list[int]], max_lengths: dict[str, int | None], out: Path) -> Path | None:
    """A histogram of token lengths per stage, with the stage's max_length marked."""
    lengths = {stage: values for stage, values in lengths.items() if values}
    if not lengths:
        return None
    with _stage_panels(len(lengths), out) as axes:
        for ax, (stage, values) in zip(axes, lengths.items(), strict=True):
            ax.hist(values, bins=min(50, max(5, len(set(values)))), color="tab:blue", alpha=0.8)
            if (limit := max_lengths.get(stage)) is not None:
                ax.axvline(limit, color="tab:red", linestyle="--", label=f"max_length {limit}")
                ax.legend(fontsize=8)
            ax.set_title(f"{stage}: tokens per row", fontsize=10)
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
    return out
