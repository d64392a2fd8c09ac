"""The tiny model and tokenizer: built locally, loaded back through from_pretrained."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import models
from posttrain.config import ModelConfig
from tests.conftest import TWO_TURNS, assistant_tokens


@pytest.fixture(scope="module")
def tiny(cache_dir):
    cfg = ModelConfig()
    return cfg, models.base_model_source(cfg, cache_dir)


def test_tiny_model_round_trips_through_from_pretrained(tiny):
    cfg, source = tiny
    model = models.load_model(source, cfg)
    again = AutoModelForCausalLM.from_pretrained(source)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 0.3e6 < model.num_parameters() < 20e6
    ids = torch.tensor([[1, 5, 9, 20]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_tiny_model_is_built_once(tiny, cache_dir):
    cfg, source = tiny
    assert models.base_model_source(cfg, cache_dir) == source


def test_tokenizer_marks_exactly_the_assistant_reply(tiny):
    cfg, source = tiny
    tok = models.load_tokenizer(source, cfg)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(marked) == "5<|im_end|>"


def test_digits_are_single_tokens(tiny):
    cfg, source = tiny
    tok = models.load_tokenizer(source, cfg)
    assert len(tok("1234", add_special_tokens=False)["input_ids"]) == 4


def test_named_chat_template_replaces_missing_one(tiny):
    cfg, source = tiny
    tok = models.load_tokenizer(source, ModelConfig(chat_template="zephyr"))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi<|im_end|>\n<|assistant|>\n"
    assert models.marks_assistant_tokens(tok)


def test_dtype_auto_is_fp32_on_cpu():
    if not torch.cuda.is_available():
        assert models.compute_dtype("auto") == torch.float32
        assert models.weights_dtype("auto", trained=True) == torch.float32


def test_dtype_auto_on_a_bf16_gpu_keeps_trained_weights_fp32(monkeypatch):
    # the choice alone, as on a GPU with bf16 units: bf16 compute, fp32 master weights for
    # the weights a plain trainer updates, bf16 for frozen ones; an explicit dtype is used as is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.compute_dtype("auto") == torch.bfloat16
    assert models.weights_dtype("auto", trained=True) == torch.float32
    assert models.weights_dtype("auto", trained=False) == torch.bfloat16
    assert models.weights_dtype("bfloat16", trained=True) == torch.bfloat16
    assert models.weights_dtype("float32", trained=False) == torch.float32
    # fp16 mixed precision: fp32 weights (the gradient scaler refuses fp16 gradients), saved fp16
    assert models.weights_dtype("float16", trained=True) == torch.float32
    assert models.weights_dtype("float16", trained=False) == torch.float16


TEMPLATE_TURNS = {
    "chatml": ("<|im_start|>assistant\n", "<|im_end|>"),
    "zephyr": ("<|assistant|>\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistral": ("[/INST]", "<|im_end|>"),
    "gemma": ("<start_of_turn>model\n", "<end_of_turn>"),
    "phi3": ("<|assistant|>\n", "<|end|>"),
    "phi4": ("<|im_start|>assistant<|im_sep|>", "<|im_end|>"),
}


@pytest.mark.parametrize("name", models.chat_templates.CHAT_TEMPLATES)
def test_every_named_template_marks_each_reply_and_its_end(tiny, name):
    """Two turns and a system message: the assistant mask covers both replies and their closing
    token, nothing of the prompts; the generation prompt is what precedes a reply."""
    cfg, source = tiny
    tok = models.load_tokenizer(source, ModelConfig(chat_template=name))
    messages = TWO_TURNS
    marked = tok.decode(assistant_tokens(tok, messages))
    header, end = TEMPLATE_TURNS[name]
    assert marked.replace(" ", "") == f"5{end}8{end}"
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "Be brief." in text and text.count(header) == 2
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(header) and text.startswith(prompt)


def test_template_without_generation_block_is_refused_with_the_fix(tiny, cache_dir):
    from posttrain.config import ConfigError
    from posttrain.pipeline import check_chat_template
    from posttrain.plan import load_config
    from tests.conftest import compose_tree

    cfg, source = tiny
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tok = models.load_tokenizer(source, ModelConfig(chat_template=plain))
    with pytest.raises(ConfigError) as e:
        check_chat_template(load_config(compose_tree([])), tok, source)
    assert str(e.value).startswith("sft.assistant_only_loss: the chat template of ")
    assert "set model.chat_template (chatml, zephyr, llama3, mistral, gemma, phi3, phi4" in str(e.value)
    assert "or sft.assistant_only_loss=false" in str(e.value)
