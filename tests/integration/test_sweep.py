"""A 2x2 grid sweep on the tiny model: SFT trained once, then the sweep table, CSV and plot."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest

from tests.conftest import FAST, posttrain_argv, run_posttrain

# after FAST, whose own align.learning_rate they replace
GRID = ["align.beta=0.05,0.5", "align.learning_rate=1e-4,3e-4"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    out, cache = root / "sweep", root / "cache"
    proc = run_posttrain(
        "-m", f"run.output_dir={out}", *FAST, *GRID, "sweep.objective=align.reward_margin", cache_dir=cache
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, proc


def test_sweep_trains_the_shared_sft_stage_once(sweep):
    out, _, proc = sweep
    assert proc.stdout.count("stage sft (sft) starting from base") == 1
    assert proc.stdout.count("stage sft (sft): reusing complete artifact") == 3
    assert proc.stdout.count("stage align (dpo) starting from sft") == 4
    assert proc.stdout.count("base model metrics reused") == 3
    # the reference (SFT) log-probs of the train and held-out pairs: computed by job 0, read by the others
    assert proc.stdout.count("reference log-probs of the train rows saved to") == 1
    assert proc.stdout.count("reference log-probs of the train rows reused from") == 3
    assert len(list((out / "0" / "sft" / "ref_logps").glob("*.parquet"))) == 2
    assert {(out / str(job) / "sft").resolve() for job in range(4)} == {out / "0" / "sft"}
    settings = [_manifest(out / str(job) / "align")["config"] for job in range(4)]
    assert sorted((s["beta"], s["learning_rate"]) for s in settings) == [
        (0.05, 1e-4),
        (0.05, 3e-4),
        (0.5, 1e-4),
        (0.5, 3e-4),
    ]


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_csv_has_one_row_per_run_with_swept_values_and_metrics(sweep):
    out, _, _ = sweep
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    for row in rows:
        config = _manifest(out / row["run"] / "align")["config"]
        assert (float(row["align.beta"]), float(row["align.learning_rate"])) == (
            config["beta"],
            config["learning_rate"],
        )
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        align = summary["stages"]["align"]["metrics"]
        assert float(row["align.reward_margin"]) == pytest.approx(align["eval_rewards/margins"])
        assert float(row["sft.exact_match"]) == pytest.approx(summary["stages"]["sft"]["metrics"]["exact_match"])
        assert row["status"] == "complete"
    # the best run is the one with the highest objective, and only it is marked
    best = max(rows, key=lambda r: float(r["align.reward_margin"]))
    assert [r["run"] for r in rows if r["best"] == "*"] == [best["run"]]


def test_markdown_table_plot_and_show(sweep):
    out, cache, proc = sweep
    table = (out / "sweep.md").read_text()
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[:4] == ["run", "align.beta", "align.learning_rate", "status"] and header[-1] == "best"
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 5
    assert "best: run " in table and "align.reward_margin" in table and "(maximize)" in table
    assert "best: run " in proc.stdout
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    show = subprocess.run(posttrain_argv("show", str(out), cache_dir=cache)[0], capture_output=True, text=True)
    assert show.returncode == 0 and show.stdout.count("complete") >= 8 and "best: run " in show.stdout


def test_gate_stops_the_chain_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run_posttrain(f"run.output_dir={out}", *FAST, "sft.gate.max_response_loss=0.5", cache_dir=tmp_path / "cache")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage sft missed its gate: response_loss ")
    assert last.endswith(
        f"> sft.gate.max_response_loss=0.5; the chain stops after sft (its model is complete in {out / 'sft'})"
    )
    assert _manifest(out / "sft")["status"] == "complete" and not (out / "align").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("stopped: stage sft missed its gate") and list(summary["stages"]) == [
        "base",
        "sft",
    ]


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_optuna_search_picks_the_best_trial_by_the_named_metric(sweep, tmp_path):
    from omegaconf import OmegaConf

    _, cache, _ = sweep  # SFT comes from the grid sweep's cache
    out = tmp_path / "search"
    proc = run_posttrain(
        "-m",
        "hydra/sweeper=posttrain_optuna",
        "hydra.sweeper.n_trials=3",
        f"run.output_dir={out}",
        *FAST,
        "align.beta=interval(0.05,0.5)",
        "sweep.objective=align.reward_margin",
        cache_dir=cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    margins = {
        job: json.loads((out / str(job) / "summary.json").read_text())["stages"]["align"]["metrics"] for job in range(3)
    }
    margins = {job: m["eval_rewards/margins"] for job, m in margins.items()}
    best_job = max(margins, key=margins.get)
    result = OmegaConf.load(out / "optimization_results.yaml")
    assert result.best_value == pytest.approx(margins[best_job])
    beta = _manifest(out / str(best_job) / "align")["config"]["beta"]
    assert result.best_params["align.beta"] == pytest.approx(beta)
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["run"] for r in rows if r["best"] == "*"] == [str(best_job)]
