"""The real model through every method for a step or two, each from the one shared SFT stage (the
reward model and on-policy pairs included): each stage saves a folder that plain transformers loads
and runs, with weights moved from its parent's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.real_model.conftest import align, run_real

pytestmark = pytest.mark.real_model

REWARD = "tests.real_model.rewards:graded_then_shorter"
PAIRS = [
    *align("dpo"),
    "+pairs@pairs=onpolicy",
    "run.stages=[sft,pairs,align]",
    "align.data={path:'stage:pairs'}",
    "pairs.num_prompts=8",
    "pairs.num_eval_prompts=2",
    "pairs.num_samples=2",
    "pairs.max_new_tokens=8",
    "pairs.generation_batch_size=8",
    "pairs.checkpoint_steps=0",
    f"pairs.reward={REWARD}",
]
GRPO = [
    *align("grpo"),
    "align.per_device_train_batch_size=4",
    "align.num_generations=2",
    "align.max_completion_length=8",
    f"align.reward={REWARD}",
]
# method -> the overrides of its chain (every one after the shared SFT; sft: that stage itself)
METHODS = {
    "sft": None,
    **{m: align(m) for m in ("dpo", "ipo", "kto", "orpo", "simpo", "cpo", "rm")},
    "pairs_dpo": PAIRS,
    "grpo": GRPO,
}
PROMPT = [{"role": "user", "content": "What is 12 + 7?"}]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def assert_generates(folder: Path) -> None:
    """Plain transformers loads the folder and generates a few tokens after a chat prompt."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    enc = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def assert_scores(folder: Path) -> None:
    """Plain transformers loads the reward model and gives a chat one finite score."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    chat = [*PROMPT, {"role": "assistant", "content": "19"}]
    enc = tokenizer.apply_chat_template(chat, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**enc).logits
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()


@pytest.mark.parametrize("method", METHODS)
def test_method_saves_a_model_transformers_loads_and_runs(method, real_sft, real_cache, real_folder, tmp_path):
    if METHODS[method] is None:
        out, stage = real_sft, "sft"
    else:
        out, stage = tmp_path / "run", "align"
        summary = run_real(out, real_cache, *METHODS[method])
        assert summary["status"] == "complete" and summary["stages"]["sft"]["status"] == "reused"
    folder = out / stage
    manifest = _manifest(folder)
    assert manifest["status"] == "complete" and manifest["metrics"]["train_steps"] == (2 if stage == "sft" else 1)
    parent = Path(manifest["parent"]["source"])
    # SFT starts from the converted base, every other method from the shared SFT
    assert parent == (real_folder if stage == "sft" else (out / "sft").resolve())

    before, after = load_file(parent / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(after) ^ set(before) == ({"score.weight"} if method == "rm" else set())  # rm: a new scalar head
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"{len(changed)} of {len(before)} weights moved"

    if method == "rm":
        assert_scores(folder)
    else:
        assert_generates(folder)
    if method == "pairs_dpo":  # DPO trained on the pairs its stage sampled from the SFT model
        assert _manifest(out / "pairs")["status"] == "complete" and "pairs" in manifest["data"]["origin"]
        assert manifest["data"]["train_rows"] >= 2
