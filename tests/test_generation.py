"""What the online stages' sampler reports beside each reply: whether it was cut at max_new_tokens
and the entropy of the distribution its tokens were drawn from (after temperature)."""

from __future__ import annotations

import math

import pytest

from posttrain import models
from posttrain.config import ModelConfig
from posttrain.generation import Sampler, SamplingSettings

PROMPTS = [[{"role": "user", "content": "What is 12 + 7?"}], [{"role": "user", "content": "Sort the letters: dcba"}]]


@pytest.fixture(scope="module")
def model_and_tokenizer(cache_dir):
    cfg = ModelConfig()
    source = models.base_model_source(cfg, cache_dir)
    return models.load_model(source, cfg), models.load_tokenizer(source, cfg)


def _sample(model_and_tokenizer, temperature: float, max_new_tokens: int, k: int = 8):
    model, tok = model_and_tokenizer
    settings = SamplingSettings(k, temperature, 1.0, max_new_tokens, "transformers")
    return Sampler(model, tok, settings, None).sample_with_details(PROMPTS, seed=0)


def test_a_near_greedy_sampler_reports_no_entropy(model_and_tokenizer):
    replies, details = _sample(model_and_tokenizer, temperature=1e-4, max_new_tokens=6)
    assert all(len(set(group)) == 1 for group in replies)  # every sample is the most likely reply
    assert all(d.entropy < 1e-3 for group in details for d in group)


def test_a_flat_sampler_reports_the_vocabulary_entropy_and_cut_replies(model_and_tokenizer):
    """At temperature 100 every token is about equally likely: the entropy is ~log(vocabulary), and
    a reply rarely draws the end token within 3 tokens, so almost every reply is cut."""
    model, _ = model_and_tokenizer
    replies, details = _sample(model_and_tokenizer, temperature=100.0, max_new_tokens=3, k=32)
    flat = [d for group in details for d in group]
    assert len(flat) == 64 and [len(g) for g in replies] == [32, 32]
    assert all(math.log(model.config.vocab_size) - 0.05 < d.entropy <= math.log(model.config.vocab_size) for d in flat)
    assert sum(d.cut for d in flat) / len(flat) > 0.9
