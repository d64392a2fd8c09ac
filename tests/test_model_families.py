"""Each model family in the registry, offline: a tiny random model from the family's own config
class, a local tokenizer with the family's special tokens and chat template, loaded through the
registry entry with `model.path=<folder>` (the path a user without internet takes), one SFT
step and one DPO step through the real pipeline, and the assistant mask of a conversation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from posttrain import chat_templates, models
from posttrain.pipeline import run_pipeline
from posttrain.plan import load_config
from tests.conftest import ANY_MODEL, TWO_TURNS, assistant_tokens, compose_tree

# registry entry -> (config class, its extra fields, special tokens, bos, the base tokenizer's eos)
FAMILIES = {
    "llama3_2_1b": (
        "LlamaConfig",
        {},
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|finetune_right_pad_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
    ),
    "qwen2_5_0_5b": ("Qwen2Config", {}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>"),
    "qwen3_0_6b": ("Qwen3Config", {"head_dim": 16}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
                   "<|endoftext|>"),
    "mistral_7b_v0_3": ("MistralConfig", {}, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
    "gemma2_2b": ("Gemma2Config", {"head_dim": 16}, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                  "<bos>", "<eos>"),
    "gemma3_1b": ("Gemma3TextConfig", {"head_dim": 16},
                  ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "phi3_mini": ("Phi3Config", {}, ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], None,
                  "<|endoftext|>"),
    "phi4": ("Phi3Config", {}, ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"], None, "<|endoftext|>"),
    "smollm2_135m": ("LlamaConfig", {}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>"),
}  # fmt: skip

STEPS = [
    "data.builtin.num_sft=64",
    "data.builtin.num_preference=32",
    "data.builtin.num_test=8",
    "sft.max_steps=1",
    "align.max_steps=1",
    "sft.per_device_train_batch_size=4",
    "align.per_device_train_batch_size=4",
    "sft.learning_rate=1e-2",
    "align.learning_rate=1e-2",
    "sft.warmup_steps=0",
    "align.warmup_steps=0",
    "sft.max_length=96",
    "align.max_length=96",
    "sft.checkpoint_steps=0",
    "align.checkpoint_steps=0",
    "sft.eval.exact_match=false",
    "align.eval.exact_match=false",
    "sft.eval.num_loss_rows=4",
    "align.eval.num_loss_rows=4",
    "data.sft.max_eval_rows=4",
    "data.preference.max_eval_rows=4",
]


def build_family_model(entry: str, folder) -> dict:
    """A 2-layer random model of the family and its tokenizer, saved like a hub checkpoint."""
    config_name, extra, special, bos, eos = FAMILIES[entry]
    registry = compose_tree([ANY_MODEL, f"model={entry}"])["model"]
    pad = next(t for t in special if "pad" in t) if any("pad" in t for t in special) else eos
    tokenizer = models.train_tokenizer(
        320, special, eos=eos, pad=pad, bos=bos, chat_template=chat_templates.CHAT_TEMPLATES[registry["chat_template"]]
    )
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return registry


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_family_model(request.param, folder)


def test_registry_template_marks_the_reply_and_the_turn_end(family):
    entry, folder, registry = family
    cfg = load_config(compose_tree([ANY_MODEL, f"model={entry}", f"model.path={folder}"])).model
    tok = models.load_tokenizer(str(folder), cfg)
    end = registry["eos_token"] or FAMILIES[entry][4]
    assert tok.eos_token == end and tok.pad_token is not None
    marked = assistant_tokens(tok, TWO_TURNS)
    assert tok.decode(marked).replace(" ", "") == f"5{end}8{end}"
    assert tok.eos_token_id in marked  # the model learns to end its turn with the token generation stops at


def test_the_pretrained_recipe_runs_one_sft_and_one_dpo_step_on_every_family(family, tmp_path, cache_dir):
    """recipe=smollm2_sft_dpo is not tied to SmolLM2: with another family's entry and folder it trains."""
    entry, folder, _ = family
    out = tmp_path / "run"
    overrides = [
        "recipe=smollm2_sft_dpo",
        f"model={entry}",
        f"model.path={folder}",
        f"run.output_dir={out}",
        f"run.cache_dir={cache_dir}",
    ]
    summary = run_pipeline(load_config(compose_tree([*overrides, *STEPS])))
    assert summary["status"] == "complete"
    before = load_file(str(folder / "model.safetensors"))
    for stage in ("sft", "align"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["metrics"]["train_steps"] == 1
        after = load_file(str(out / stage / "model.safetensors"))
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
        before = after
    final = transformers.AutoModelForCausalLM.from_pretrained(out / "align")
    assert final.config.model_type == getattr(transformers, FAMILIES[entry][0]).model_type
