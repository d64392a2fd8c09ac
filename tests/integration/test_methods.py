"""Every alignment method through the pipeline after the default recipe's SFT stage (shared with
the default-recipe test through the session cache): its weights change, its loss falls, and its
own metric moves the right way on the built-in preference data.

pytest -m slow
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.pipeline import run_pipeline
from tests.conftest import compose_tree

# the default recipe's SFT stage, unchanged (so its key matches); a short alignment stage
SHARED = [
    "align.max_steps=40",
    "align.per_device_train_batch_size=32",
    "align.warmup_steps=0",
    "align.logging_steps=4",
    "align.eval.exact_match=false",
    "align.eval.num_loss_rows=32",
    "align.checkpoint_steps=0",
]

# method -> (learning rate, the logged metric that must rise)
METHODS = {
    "dpo": (5e-4, "rewards/margins"),
    "ipo": (5e-4, "rewards/margins"),
    "kto": (5e-4, "rewards/margins"),
    "orpo": (1e-3, "rewards/margins"),
    "cpo": (5e-4, "rewards/margins"),
    "simpo": (5e-4, "rewards/margins"),
    "rm": (5e-4, "accuracy"),
}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_its_metric_moves(method, cache_dir, tmp_path):
    lr, metric = METHODS[method]
    out = tmp_path / "run"
    overrides = [f"align={method}", f"align.learning_rate={lr}", f"run.output_dir={out}", f"run.cache_dir={cache_dir}"]
    summary = run_pipeline(load_config(compose_tree([*overrides, *SHARED])))
    assert summary["status"] == "complete"
    manifest = json.loads((out / "align" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["method"] == ("dpo" if method == "ipo" else method)

    sft, align = load_file(str(out / "sft" / "model.safetensors")), load_file(str(out / "align" / "model.safetensors"))
    changed = [k for k in align if k in sft and not torch.equal(sft[k], align[k])]
    assert len(changed) > len(align) // 2

    logged = [r for r in _records(out / "align") if "loss" in r]
    assert len(logged) >= 8
    first, last = logged[:2], logged[-2:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, metric) > mean(first, metric)
    evaluated = manifest["metrics"]
    if method == "rm":
        assert evaluated["eval_accuracy"] > 0.6
        assert (out / "align" / "config.json").exists()
        config = json.loads((out / "align" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    elif method in ("dpo", "ipo", "kto"):  # the reference: margins start at exactly 0
        assert evaluated["eval_rewards/margins"] > 0
