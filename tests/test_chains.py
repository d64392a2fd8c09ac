"""Stage chains as the user writes them: valid orders load, invalid ones are one-line plan-time
errors, and an iterative sft -> dpo -> dpo runs with the second DPO's reference pinned to SFT."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.pipeline import run_pipeline
from posttrain.plan import load_config
from tests.conftest import FAST, compose_tree

SECOND_DPO = ["+align@align2=dpo", "run.stages=[sft,align,align2]", "align2.init_from=align"]


def load(*overrides: str):
    return load_config(compose_tree(list(overrides)))


@pytest.mark.parametrize(
    "overrides, chain",
    [
        ([], ["sft:sft", "align:dpo"]),
        (["align=orpo"], ["sft:sft", "align:orpo"]),
        (["sft=none", "align=orpo", "align.init_from=base"], ["align:orpo"]),
        (["align=kto"], ["sft:sft", "align:kto"]),
        (["align=rm"], ["sft:sft", "align:rm"]),
        (["align=simpo"], ["sft:sft", "align:simpo"]),
        (["align=cpo"], ["sft:sft", "align:cpo"]),
        (["align=ipo"], ["sft:sft", "align:dpo"]),
        (SECOND_DPO, ["sft:sft", "align:dpo", "align2:dpo"]),
    ],
)
def test_chains_users_write_load(overrides, chain):
    cfg = load(*overrides)
    assert [f"{name}:{stage.method}" for name, stage in cfg.stages.items()] == chain


def test_ipo_is_dpo_with_the_ipo_loss():
    assert load("align=ipo").stages["align"].loss_type == ["ipo"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["align=orpo", "align.reference=base"],
            "align.reference: orpo is reference-free and takes no reference; remove align.reference "
            "(methods with one: dpo, kto)",
        ),
        (["align.reference=later"], "align.reference: 'later' is not a causal LM before 'align'; allowed: base, sft"),
        (
            ["align=rm", *SECOND_DPO[:2], "align2.init_from=previous"],
            "align2.init_from: 'previous' is the reward model 'align', which does not generate; "
            "start dpo from one of: base, sft",
        ),
        (
            ["data.preference.format=messages"],
            "align.data.format: 'messages' rows do not fit dpo (preference data); allowed: preference, hh",
        ),
        (
            ["data.preference.path=builtin:sft"],
            "align.data.path: builtin:sft is sft data and does not fit dpo (preference data); use builtin:preference",
        ),
        (
            ["data.sft.path=builtin:preference"],
            "sft.data.path: builtin:preference is preference data and does not fit sft (sft data); use builtin:sft",
        ),
        (["align.peft=adapter"], "align.peft: 'adapter' is not one of null, none, lora, qlora"),
        (["peft.handoff=copy"], "peft.handoff: 'copy' is not one of merge, stack"),
        (["align=kto", "align.per_device_train_batch_size=1"], "align.per_device_train_batch_size: KTO needs >= 2"),
        (
            ["align=simpo", "align.loss_type=sigmoid"],
            "align.loss_type: simpo's loss is simpo; for others use method cpo",
        ),
    ],
)
def test_invalid_chains_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load(*overrides)
    assert str(e.value) == message


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(), reason="QLoRA can run here"
)
@pytest.mark.parametrize("overrides", [["peft=lora", "peft.method=qlora"], ["align.peft=qlora"]])
def test_qlora_without_a_gpu_is_a_plan_time_error(overrides):
    with pytest.raises(ConfigError) as e:
        load(*overrides)
    key = "align.peft" if overrides[0].startswith("align") else "peft.method"
    assert str(e.value).startswith(f"{key}: qlora needs ")
    assert "on this machine use lora" in str(e.value)


def test_iterative_dpo_with_its_reference_pinned_to_sft(tmp_path, cache_dir, capfd):
    """sft -> dpo -> dpo where the second DPO starts from the first and compares with SFT: it loads
    the SFT model as its reference and reuses the SFT log-probs the first DPO computed."""
    out = tmp_path / "run"
    second = ["align2.reference=sft", "align2.max_steps=4", "align2.learning_rate=3e-4", "align2.max_length=128"]
    overrides = [*FAST, *SECOND_DPO, *second, f"run.output_dir={out}", f"run.cache_dir={cache_dir}"]
    cfg = load_config(compose_tree(overrides))
    assert run_pipeline(cfg)["status"] == "complete"
    manifests = {s: json.loads((out / s / "manifest.json").read_text()) for s in ("sft", "align", "align2")}
    assert manifests["align2"]["parent"]["key"] == manifests["align"]["key"]
    assert manifests["align2"]["status"] == "complete"
    logged = capfd.readouterr().out
    assert f"reference log-probs of the train rows reused from {(out / 'sft').resolve() / 'ref_logps'}" in logged
