"""A stage's training curves as a PNG (`<stage>/curves.png`): loss, learning rate, the
preference rewards (margin, accuracy) and an online stage's signal (sampled reward, groups with
equal rewards, entropy, replies cut at the length limit, the band's share) when the method logs them."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("loss", "training loss"),
    ("learning_rate", "learning rate"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "reward accuracy"),
    ("reward", "sampled reward"),
    ("frac_reward_zero_std", "groups with equal rewards"),
    ("entropy", "entropy"),
    ("completions/clipped_ratio", "replies cut at max length"),
    ("band/kept_share", "share of the pool in the band"),
)


def plot_curves(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Plot the training log records of `metrics_path` into `out`; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    series = [(label, [(r["step"], r[key]) for r in rows if key in r]) for key, label in PANELS]
    series = [(label, points) for label, points in series if points]
    if not series:
        return None
    columns = min(len(series), 4)
    rows_of_panels = -(-len(series) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4 * columns, 3.2 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    for ax, (label, points) in zip(axes.flat, series, strict=False):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
