"""Where the default recipe's wall time goes: start-up, data, each trainer, evaluation, saving.

    python bench/recipe_overhead.py                  # the default recipe, fresh cache: ~4 min on 2 cores
    python bench/recipe_overhead.py sft.max_steps=20 align.max_steps=10   # any overrides

Runs `posttrain` in a subprocess on a fresh cache and run folder, then splits the wall time
with the run's own `summary.json` (stage timings) and each stage's trainer metrics
(`train_runtime`, `eval_runtime`, `ref_logps_runtime`). Framework overhead = everything that is
not a trainer's optimizer steps, the reference's forward passes (precomputed log-probs: TRL runs
them inside each step otherwise), the trainer's evaluation or held-out generation. Prints a table, appends to
results/recipe_overhead.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "POSTTRAIN_CACHE": str(Path(tmp) / "cache"), "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain.cli", f"run.output_dir={out}", *overrides],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"posttrain failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
    timings, stages = summary["timings_s"], summary["stages"]
    parts: dict[str, float] = {"start-up (imports, config, plan)": wall - summary["total_s"]}
    parts["data, tokenizer, model build"] = timings["setup"]
    parts["evaluation: base model"] = timings.get("eval:base", 0.0)
    work = parts["evaluation: base model"]
    for name, stage in stages.items():
        if name == "base" or f"train:{name}" not in timings:
            continue
        metrics = stage["metrics"]
        steps, trainer_eval = metrics.get("train_runtime", 0.0), metrics.get("eval_runtime", 0.0)
        ref_logps = metrics.get("ref_logps_runtime", 0.0)
        parts[f"{name}: optimizer steps"] = steps
        parts[f"{name}: reference log-probs"] = ref_logps
        parts[f"{name}: trainer evaluation"] = trainer_eval
        parts[f"{name}: load, tokenize, set up"] = timings[f"train:{name}"] - steps - trainer_eval - ref_logps
        parts[f"{name}: held-out generation"] = timings.get(f"eval:{name}", 0.0)
        parts[f"{name}: save"] = timings.get(f"save:{name}", 0.0)
        # the reference's forward passes, done once before the steps instead of in each of them
        work += steps + ref_logps + trainer_eval + timings.get(f"eval:{name}", 0.0)
    parts["rest (summary, plots)"] = wall - sum(parts.values())
    overhead = wall - work
    rows = [[name, round(seconds, 2), f"{100 * seconds / wall:.1f}%"] for name, seconds in parts.items()]
    rows += [
        ["total wall time", round(wall, 2), "100%"],
        ["framework overhead", round(overhead, 2), f"{100 * overhead / wall:.1f}%"],
    ]
    record = {
        "overrides": overrides,
        "wall_s": round(wall, 2),
        "overhead_s": round(overhead, 2),
        "overhead_share": round(overhead / wall, 4),
        "parts_s": {k: round(v, 2) for k, v in parts.items()},
    }
    report("recipe_overhead", ["part", "seconds", "share"], rows, [record])


if __name__ == "__main__":
    main()
