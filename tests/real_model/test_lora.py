"""LoRA SFT -> DPO on the real model under both hand-off policies: each saved model is the base
plus its adapters' scale x B @ A (merge: DPO's LoRA on the merged SFT model; stack: beside the SFT
adapter on the base), every other weight the base's."""

from __future__ import annotations

import json

import pytest

from posttrain.plan import load_config
from tests.conftest import compose_tree
from tests.integration.test_lora_handoff import LORA, assert_merged_models
from tests.real_model.conftest import align, real_overrides, run_real

pytestmark = pytest.mark.real_model

# learning rates LoRA moves visibly in one or two steps
RATES = ["sft.learning_rate=1e-3", "align.learning_rate=1e-4"]


@pytest.mark.parametrize("handoff", ["merge", "stack"])
def test_merged_models_are_the_base_plus_their_adapters(handoff, real_cache, tmp_path):
    out = tmp_path / "run"
    overrides = [*align("dpo"), *LORA, f"peft.handoff={handoff}", "peft.save_adapter=true", *RATES]
    assert run_real(out, real_cache, *overrides)["status"] == "complete"
    cfg = load_config(compose_tree(real_overrides(out, real_cache, *overrides)))
    assert_merged_models(out, cfg, real_cache)
    if handoff == "stack":
        adapters = json.loads((out / "align" / "adapters.json").read_text())["adapters"]
        assert adapters == [str((out / stage / "adapter").resolve()) for stage in ("sft", "align")]
