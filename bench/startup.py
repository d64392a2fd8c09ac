"""Start-up time of `posttrain --help` and `posttrain plan=true` (the tiny recipe).

    python bench/startup.py            # 5 runs each, median; ~30 s

Each is a fresh process, as a user types it. Targets: --help < 2 s, plan=true < 5 s.
Prints a table, appends to results/startup.jsonl.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

from common import report

TARGETS = {"posttrain --help": 2.0, "posttrain plan=true": 5.0}


def timed(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with tempfile.TemporaryDirectory() as tmp:
        commands = {"posttrain --help": ["--help"], "posttrain plan=true": ["plan=true", f"run.output_dir={tmp}/run"]}
        results = {name: timed(args, runs) for name, args in commands.items()}
    rows, records = [], []
    for name, times in results.items():
        median = statistics.median(times)
        rows.append(
            [name, round(median, 2), round(min(times), 2), TARGETS[name], "yes" if median < TARGETS[name] else "no"]
        )
        records.append({"command": name, "median_s": round(median, 3), "runs": [round(t, 3) for t in times]})
    report("startup", ["command", "median s", "best s", "target s", "met"], rows, records)


if __name__ == "__main__":
    main()
