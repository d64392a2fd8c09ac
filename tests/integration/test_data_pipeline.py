"""A whole run on users' data: the built-in tasks rewritten into sharegpt, alpaca, Anthropic HH and
renamed-column CSV files, mixed by weight on the command line, through SFT -> DPO."""

from __future__ import annotations

import json

import pytest

from posttrain.data.builtin import TaskSpec, write_tasks
from tests.conftest import FAST, run_posttrain


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def users_files(folder):
    """The built-in rows in four public formats (two SFT, two preference)."""
    import pandas as pd

    tasks = write_tasks(TaskSpec(num_sft=256, num_preference=128, num_test=32), folder / "builtin")
    sft = [json.loads(line) for line in (tasks / "sft" / "train.jsonl").read_text().splitlines()]
    prefs = [json.loads(line) for line in (tasks / "preference" / "train.jsonl").read_text().splitlines()]
    speaker = {"user": "human", "assistant": "gpt"}
    sharegpt = [
        {"id": str(i), "conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in r["messages"]]}
        for i, r in enumerate(sft[:128])
    ]
    alpaca = [
        {"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
        for r in sft[128:]
    ]
    pd.DataFrame(alpaca).to_parquet(folder / "alpaca.parquet")
    hh = [
        {
            "chosen": f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant: {r['chosen'][0]['content']}",
            "rejected": f"\n\nHuman: {r['prompt'][0]['content']}\n\nAssistant: {r['rejected'][0]['content']}",
        }
        for r in prefs[:64]
    ]
    csv_rows = [
        {"question": r["prompt"][0]["content"], "good": r["chosen"][0]["content"], "bad": r["rejected"][0]["content"]}
        for r in prefs[64:]
    ]
    pd.DataFrame(csv_rows).to_csv(folder / "pairs.csv", index=False)
    return (
        _jsonl(folder / "sharegpt.jsonl", sharegpt),
        str(folder / "alpaca.parquet"),
        _jsonl(folder / "hh.jsonl", hh),
        str(folder / "pairs.csv"),
    )


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_mixture_of_user_formats_trains_end_to_end(tmp_path, cache_dir):
    sharegpt, alpaca, hh, pairs = users_files(tmp_path)
    out = tmp_path / "run"
    columns = "{prompt: question, chosen: good, rejected: bad}"
    result = run_posttrain(
        *FAST,
        f"run.output_dir={out}",
        "data.sft.path=null",
        f"+data.sft.sources=[{{path: {sharegpt}, weight: 1}}, {{path: {alpaca}, format: alpaca, weight: 3}}]",
        "data.sft.max_rows=200",
        "data.preference.path=null",
        "data.preference.eval_fraction=0.1",
        f"+data.preference.sources=[{{path: {hh}}}, {{path: {pairs}, columns: {columns}}}]",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "data_report.json").read_text())
    sft, align = report["sft"], report["align"]
    assert [(s["format"], s["used"]) for s in sft["sources"]] == [("sharegpt", 50), ("alpaca", 150)]
    assert sft["mixed_rows"] == 200 and sft["train_rows"] == 192 and sft["eval_rows"] > 0  # 12 steps x 16 (FAST)
    assert [s["format"] for s in align["sources"]] == ["hh", "preference"]
    assert align["tokens"]["max"] > align["tokens"]["min"] > 0
    assert "data for sft: 192 train rows (of 200: what its max_steps read)" in result.stdout
    assert "| sharegpt" in result.stdout
    assert (out / "data_report.md").read_text().startswith("data for sft")
    assert (out / "data_lengths.png").stat().st_size > 0
    manifest = json.loads((out / "align" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["data"]["curation"]["sources"][1]["source"] == pairs
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
