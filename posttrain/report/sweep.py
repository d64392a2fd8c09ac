"""The end of a sweep (`posttrain -m ...`): one row per run with the swept values and each
stage's key metrics, the best run marked, as `sweep.md`, `sweep.csv` and `sweep.png` (the
objective against the swept values) in the sweep folder.

    posttrain -m align.beta=0.05,0.1,0.5 sweep.objective=align.exact_match
    posttrain show outputs/sweep            # prints the same table again
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.report.table import markdown_table

# summary.json metric keys shown per stage, with their column names (also accepted in sweep.objective)
METRICS = {
    "exact_match": "exact_match",
    "response_loss": "response_loss",
    "train_loss": "train_loss",
    "eval_rewards/accuracies": "reward_acc",
    "eval_rewards/margins": "reward_margin",
}


@dataclass
class SweepRun:
    folder: Path
    # swept key -> value as written on the command line
    params: dict[str, str]
    # "<stage>.<column>" -> value
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "complete"


def _overrides(folder: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    path = folder / ".hydra" / "overrides.yaml"
    pairs = [str(o).split("=", 1) for o in OmegaConf.load(path)] if path.exists() else []
    return {k.lstrip("+~"): v for k, v, *_ in (p + [""] for p in pairs)}


def collect(sweep_dir: Path) -> list[SweepRun]:
    """Every numbered run folder of a sweep, with the overrides that differ between runs."""
    folders = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    overrides = {f: _overrides(f) for f in folders}
    keys = sorted({k for o in overrides.values() for k in o})
    swept = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    runs = []
    for folder in folders:
        run = SweepRun(folder, {k: overrides[folder].get(k, "") for k in swept})
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            run.status = "failed" if (folder / "resolved.yaml").exists() else "not run"
            runs.append(run)
            continue
        for stage, result in summary["stages"].items():
            for key, column in METRICS.items():
                if isinstance(result["metrics"].get(key), int | float):
                    run.metrics[f"{stage}.{column}"] = float(result["metrics"][key])
        run.status = "stopped by gate" if summary.get("status", "").startswith("stopped") else "complete"
        runs.append(run)
    return runs


def ranked_objective(sweep_dir: Path, objective: str) -> str:
    """The objective the runs were ranked by (each run's resolved.yaml holds it as load_config
    resolved it: a stage that does not run hands it to the last that does) when they agree; else
    `objective` as given."""
    from omegaconf import OmegaConf

    paths = sorted(sweep_dir.glob("*/resolved.yaml"))
    ranked = {str(OmegaConf.load(path).sweep.objective) for path in paths}
    return ranked.pop() if len(ranked) == 1 else objective


def objective_column(objective: str) -> str:
    """`align.eval_rewards/accuracies` and `align.reward_acc` name the same column."""
    stage, _, metric = objective.partition(".")
    return f"{stage}.{METRICS.get(metric, metric)}"


def objective_value(summary: dict, objective: str) -> float | None:
    """`objective` (`<stage>.<metric or column>`) read from one run's summary."""
    stage, _, metric = objective.partition(".")
    metrics = summary.get("stages", {}).get(stage, {}).get("metrics", {})
    key = next((k for k, column in METRICS.items() if column == metric), metric)
    value = metrics.get(key, metrics.get(metric))
    return float(value) if isinstance(value, int | float) else None


def best_run(runs: list[SweepRun], objective: str, direction: str) -> SweepRun | None:
    column = objective_column(objective)
    scored = [r for r in runs if isinstance(r.metrics.get(column), float) and not math.isnan(r.metrics[column])]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda r: r.metrics[column])


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(runs: list[SweepRun], objective: str, direction: str) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (metric values as floats, "-" where a run has none)."""
    best = best_run(runs, objective, direction)
    params = list(runs[0].params) if runs else []
    metrics = list(dict.fromkeys(m for r in runs for m in r.metrics))  # chain order: base, sft, align
    header = ["run", *params, "status", *metrics, "best"]
    rows = [
        [
            r.folder.name,
            *r.params.values(),
            r.status,
            *(r.metrics.get(m, "-") for m in metrics),
            "*" * (r is best),
        ]
        for r in runs
    ]
    return header, rows


def plot(runs: list[SweepRun], objective: str, direction: str, out: Path) -> Path | None:
    """The objective against the first swept value, one line per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = objective_column(objective)
    scored = [r for r in runs if column in r.metrics]
    if not scored or not scored[0].params:
        return None
    first, *others = list(scored[0].params)
    lines: dict[str, list[tuple[str, float]]] = {}
    for r in scored:
        label = ", ".join(f"{k}={r.params[k]}" for k in others) or column
        lines.setdefault(label, []).append((r.params[first], r.metrics[column]))
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(_is_number(x) for points in lines.values() for x, _ in points)
    for label, points in lines.items():
        points.sort(key=lambda p: float(p[0]) if numeric else p[0])
        xs = [float(x) if numeric else x for x, _ in points]
        ax.plot(xs, [y for _, y in points], marker="o", label=label)
    values = sorted({float(r.params[first]) for r in scored}) if numeric else []
    if len(values) > 2 and values[0] > 0 and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
        ax.minorticks_off()
    if values:
        ax.set_xticks(values, [f"{v:g}" for v in values])
    best = best_run(runs, objective, direction)
    if best is not None:
        x = float(best.params[first]) if numeric else best.params[first]
        ax.scatter([x], [best.metrics[column]], s=160, facecolors="none", edgecolors="red", label="best")
    ax.set_xlabel(first)
    ax.set_ylabel(column)
    ax.set_title(f"{column} ({direction})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def write_report(sweep_dir: Path, objective: str, direction: str) -> str:
    """Write sweep.md, sweep.csv and sweep.png into `sweep_dir`; return the markdown table."""
    runs = collect(sweep_dir)
    header, rows = table(runs, objective, direction)
    text = markdown_table(header, [[_cell(c) for c in row] for row in rows])
    best = best_run(runs, objective, direction)
    verdict = (
        f"best: run {best.folder.name} ({', '.join(f'{k}={v}' for k, v in best.params.items())}), "
        f"{objective_column(objective)} = {best.metrics[objective_column(objective)]:.4g} ({direction})"
        if best
        else f"no run has {objective_column(objective)}"
    )
    (sweep_dir / "sweep.md").write_text(f"{text}\n\n{verdict}\n")
    with (sweep_dir / "sweep.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    plot(runs, objective, direction, sweep_dir / "sweep.png")
    return f"{text}\n{verdict}"
