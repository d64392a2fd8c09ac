"""LoRA SFT -> DPO under both hand-off policies: the saved models are base + adapters, and the
DPO stage's reference is the SFT model (not the bare base). QLoRA (stacked on a 4-bit base)
runs too where a CUDA GPU and bitsandbytes are present."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain import models, peft_handoff
from posttrain.artifacts import read_json
from posttrain.pipeline import run_pipeline
from posttrain.plan import load_config
from tests.conftest import FAST, compose_tree
from tests.integration.test_resume import TOLERANCE, _max_difference, _rerun, _start, _wait_for

LORA = ["peft=lora", "peft.r=8", "peft.alpha=16", "peft.dropout=0.0"]
QLORA_HERE = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
POLICIES = {
    "merge": ["peft.handoff=merge"],
    "stack": ["peft.handoff=stack"],
    # fp32 full-precision weights, so merged models compare at 1e-5 (compute is bf16 on the 4-bit base)
    "qlora": ["peft.method=qlora", "peft.handoff=stack", "model.dtype=float32"],
}


@pytest.fixture(
    scope="module",
    params=[
        "merge",
        "stack",
        pytest.param("qlora", marks=pytest.mark.skipif(not QLORA_HERE, reason="needs a CUDA GPU and bitsandbytes")),
    ],
)
def handoff_run(request, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"lora-{request.param}") / "run"
    overrides = [*FAST, *LORA, *POLICIES[request.param], "peft.save_adapter=true"]
    cfg = load_config(compose_tree([*overrides, f"run.output_dir={out}", f"run.cache_dir={cache_dir}"]))
    assert run_pipeline(cfg)["status"] == "complete"
    return request.param, out, cfg


def lora_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """weight name -> scale * B @ A, read from a saved adapter."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            deltas[name] = scale * (b.double() @ a.double())
    return deltas


def test_each_merged_model_is_its_base_plus_its_adapters(handoff_run, cache_dir):
    _, out, cfg = handoff_run
    assert_merged_models(out, cfg, cache_dir)


def assert_merged_models(out: Path, cfg, cache_dir: Path) -> None:
    """SFT's model is base + its adapter; DPO's, that plus DPO's adapter (merge: DPO's LoRA sits on
    the merged SFT model; stack: on the base, beside the SFT adapter); every other weight is the base's."""
    source = Path(models.base_model_source(cfg.model, cache_dir))
    base = load_file(str(source / "model.safetensors"))
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    sft_delta = lora_delta(out / "sft" / "adapter")
    align_delta = lora_delta(out / "align" / "adapter")
    assert sft_delta.keys() == align_delta.keys()
    assert len(sft_delta) == layers * len(cfg.model.lora_target_modules)
    sft = load_file(str(out / "sft" / "model.safetensors"))
    align = load_file(str(out / "align" / "model.safetensors"))
    assert sft.keys() == align.keys() == base.keys(), "plain models, no adapter keys"
    for name in sft_delta:
        expected_sft = base[name].double() + sft_delta[name]
        assert torch.allclose(sft[name].double(), expected_sft, atol=1e-5)
        expected_align = expected_sft + align_delta[name]
        assert torch.allclose(align[name].double(), expected_align, atol=1e-5)
        assert sft_delta[name].abs().max() > 1e-4 and align_delta[name].abs().max() > 1e-7
    untouched = [k for k in base if k not in sft_delta]
    assert all(torch.equal(base[k], align[k]) for k in untouched)


def test_stack_records_the_adapter_chain(handoff_run, cache_dir):
    policy, out, cfg = handoff_run
    lineage = json.loads((out / "align" / "adapters.json").read_text()) if policy != "merge" else None
    if policy == "merge":
        assert not (out / "align" / "adapters.json").exists()
        return
    assert lineage["base"] == models.base_model_source(cfg.model, cache_dir)
    assert lineage["adapters"] == [str((out / "sft" / "adapter").resolve()), str((out / "align" / "adapter").resolve())]


def test_stacked_reference_is_the_sft_model(handoff_run, cache_dir):
    """The stacked policy with its new adapter off gives the SFT model's logits, even once the new
    adapter has moved; with it on, the logits differ."""
    policy, out, cfg = handoff_run
    if policy != "stack":
        pytest.skip("merge: the reference is the merged SFT folder itself; qlora: a 4-bit base differs from it")
    assert_stacked_reference(out, cfg)


def assert_stacked_reference(out: Path, cfg) -> None:
    chain = peft_handoff.lineage(str(out / "sft"))
    model = models.load_model(chain["base"], cfg.model)
    new_adapter = peft_handoff.lora_config(cfg.peft, cfg.model, "causal_lm")
    stacked = peft_handoff.stack_adapters(model, chain["adapters"], new_adapter)
    trainable = {n for n, p in stacked.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # only the new adapter trains
    with torch.no_grad():
        for name, param in stacked.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))  # as if trained
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 12, 60]])
    sft_model = AutoModelForCausalLM.from_pretrained(out / "sft")
    with torch.no_grad():
        expected = sft_model(ids).logits
        with peft_handoff.without_new_adapter(stacked):
            reference = stacked(ids).logits
        policy_logits = stacked(ids).logits
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(policy_logits, expected, atol=1e-3)


def test_both_policies_give_dpo_the_same_reference_log_probs(handoff_run):
    """The two runs train the same SFT adapter; DPO's precomputed reference log-probs (the SFT
    model's) agree, so the stacked reference is base + SFT adapter, not the bare base."""
    policy, out, _ = handoff_run
    merge_run = out.parent.parent / "lora-merge0" / "run"
    if policy != "stack" or not merge_run.exists():
        pytest.skip("compares the stack run with the merge run")
    stack, merge = ([*(run / "sft" / "ref_logps").glob("train-*.parquet")] for run in (out, merge_run))
    assert len(stack) == len(merge) == 1
    stack, merge = pd.read_parquet(stack[0]), pd.read_parquet(merge[0])
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(torch.tensor(merge[column]), torch.tensor(stack[column]), atol=1e-3)


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_killed_stacked_stage_resumes_to_the_same_adapter(handoff_run, tmp_path):
    """kill -9 after the DPO stage's first checkpoint; the re-run resumes the new adapter (not a
    frozen one, as transformers' own PEFT resume would) and ends with the uninterrupted weights."""
    policy, reference, _ = handoff_run
    if policy != "stack":
        pytest.skip("the stacked hand-off's own resume path")
    out, cache = tmp_path / "run", tmp_path / "cache"
    extra = [*LORA, *POLICIES["stack"], "peft.save_adapter=true"]  # with checkpoints every 2 DPO steps
    proc = _start(out, cache, *extra, log=tmp_path / "log.txt")
    # written in full (a half-written one is rightly ignored by the re-run)
    _wait_for(lambda: read_json(out / "align" / "checkpoints" / "checkpoint-2" / "trainer_state.json"), proc)
    proc.kill()
    proc.wait()
    rerun = _rerun(out, cache, *extra)
    assert "stage align (dpo) resuming" in rerun.stdout
    assert _max_difference(out / "align", reference / "align") <= TOLERANCE
