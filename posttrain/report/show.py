"""`posttrain show RUN_DIR`: a run's stage chain with status, lineage, time and metrics.

posttrain show outputs/tiny_sft_dpo/2026-11-25_10-00-00
posttrain show outputs/sweep            # a sweep folder: every numbered run in it
"""

from __future__ import annotations

import time
from pathlib import Path

from posttrain import artifacts
from posttrain.locks import FileLock, LockedError

METRICS = (
    ("exact_match", "exact_match"),
    ("train_loss", "train_loss"),
    ("eval_rewards/accuracies", "reward_acc"),
    ("eval_rewards/margins", "margin"),
)


def _stage_names(run_dir: Path) -> list[str]:
    """Stage folders in chain order (from resolved.yaml), else every folder with a manifest."""
    resolved = run_dir / "resolved.yaml"
    if resolved.exists():
        from omegaconf import OmegaConf

        names = list(OmegaConf.load(resolved).run.stages)
        return [n for n in names if (run_dir / n).exists()]
    return sorted(p.name for p in run_dir.iterdir() if (p / artifacts.MANIFEST).exists())


def _in_use(run_dir: Path) -> bool:
    try:
        with FileLock(run_dir / ".posttrain.lock", "run folder"):
            return False
    except LockedError:
        return True
    except OSError:
        return False


def _status(manifest: dict, folder: Path, running: bool) -> str:
    status = manifest.get("status", "?")
    if status == "running" and not running:
        checkpoint = artifacts.last_checkpoint(folder)
        return f"crashed, resumable from {checkpoint.name}" if checkpoint else "crashed"
    if status == "interrupted":
        return f"interrupted at {Path(str(manifest.get('checkpoint'))).name}"
    return status


def _duration(manifest: dict) -> str:
    attempts = manifest.get("attempts") or []
    # a completed attempt has `finished`; one stopped by a preemption or an error, `ended`
    spent = sum(a.get("finished", a.get("ended", a["started"])) - a["started"] for a in attempts)
    if not spent:
        return "-"
    return f"{spent / 60:.1f} min" + (f" ({len(attempts)} attempts)" if len(attempts) > 1 else "")


def _metric(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


def describe(run_dir: Path) -> str:
    running = _in_use(run_dir)
    header = ["stage", "method", "status", "key", "from", "started", "time", *(t for _, t in METRICS), "folder"]
    rows = []
    for name in _stage_names(run_dir):
        folder = run_dir / name
        manifest = artifacts.read_manifest(folder) or {}
        attempts = manifest.get("attempts") or [{}]
        started = attempts[0].get("started")
        where = f"-> {folder.resolve()}" if folder.is_symlink() else "."
        rows.append(
            [
                name,
                manifest.get("method", "?"),
                _status(manifest, folder, running) if manifest else "no manifest",
                str(manifest.get("key", "-"))[:10],
                (manifest.get("parent") or {}).get("name", "-"),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started else "-",
                _duration(manifest),
                *(_metric((manifest.get("metrics") or {}).get(k)) for k, _ in METRICS),
                where,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"{run_dir}" + ("  (in use by a running posttrain)" if running else "")]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def main(argv: list[str]) -> int | str:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        return "usage: posttrain show RUN_DIR   (a run folder, or a sweep folder of numbered runs)"
    run_dir = Path(argv[0]).expanduser()
    if not run_dir.is_dir():
        return f"error: {run_dir}: no such run folder"
    runs = sorted((p for p in run_dir.iterdir() if (p / "resolved.yaml").exists()), key=lambda p: (len(p.name), p.name))
    if (run_dir / "resolved.yaml").exists() or not runs:
        runs = [run_dir]
    if not any(_stage_names(r) for r in runs):
        return f"error: {run_dir}: holds no posttrain stages (no manifest.json in its folders)"
    print("\n\n".join(describe(r) for r in runs))
    if (run_dir / "sweep.md").exists():
        print(f"\n{(run_dir / 'sweep.md').read_text()}", end="")
    return 0
