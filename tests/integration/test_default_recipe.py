"""The default recipe end to end (minutes): each stage must make the model better.

pytest -m slow
"""

from __future__ import annotations

import json

import pytest

from tests.integration.test_pipeline import posttrain


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_default_recipe_each_stage_helps(method, cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = posttrain(f"align={method}", f"run.output_dir={out}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((out / "summary.json").read_text())["stages"]
    base, sft, align = (stages[s]["metrics"] for s in ("base", "sft", "align"))
    assert base["exact_match"] < 0.05
    assert sft["exact_match"] >= 0.6
    assert align["eval_rewards/accuracies"] > 0.8
    assert align["exact_match"] > sft["exact_match"]
