"""A stage's training curves as a PNG (`<stage>/curves.png`): loss, learning rate, and the
preference rewards (margin, accuracy) when the method logs them."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("loss", "training loss"),
    ("learning_rate", "learning rate"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "reward accuracy"),
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
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (label, points) in zip(axes[0], series, strict=True):
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
