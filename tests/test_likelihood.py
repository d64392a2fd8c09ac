"""The model's own signal as a score (posttrain/likelihood.py): `loss` is the reply's mean token loss
as the model computes it for one unpadded conversation, `ifd` the ratio of that loss to the loss
after an empty prompt, with rows whose instruction does not help ranked below every other."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import models
from posttrain.config import ModelConfig
from posttrain.likelihood import LikelihoodScorer

PROMPTS = ["What is 2 + 3?", "Sort the letters: c a b", "Reverse the letters: x y z", "How many items: fig fig"]
REPLIES = ["5", "a b c", "z y x and some more words to make this reply longer than the others", "2"]


@pytest.fixture(scope="module")
def base(cache_dir):
    cfg = ModelConfig()
    source = models.base_model_source(cfg, cache_dir)
    return source, cfg, models.load_tokenizer(source, cfg), models.load_model(source, cfg).eval()


def loss_by_hand(model, tok, prompt: str, reply: str) -> float:
    """One conversation, no batching or padding: the model's own loss on the reply's tokens."""
    turns = [{"role": "user", "content": prompt}]
    head = tok(tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    whole = [*turns, {"role": "assistant", "content": reply}]
    text = tok.apply_chat_template(whole, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    labels = ids.clone()
    labels[0, : len(head["input_ids"])] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_loss_scores_minus_the_replys_mean_token_loss_batched_as_alone(base):
    source, cfg, tok, model = base
    scores = LikelihoodScorer("loss", source, cfg, tok)(PROMPTS, REPLIES)
    for prompt, reply, score in zip(PROMPTS, REPLIES, scores, strict=True):
        assert math.isclose(score, -loss_by_hand(model, tok, prompt, reply), rel_tol=1e-4, abs_tol=1e-5)
    assert len(set(scores)) == len(scores), "each reply its own score"


def test_ifd_is_the_loss_with_the_prompt_over_the_loss_without_and_a_useless_prompt_ranks_last(base):
    source, cfg, tok, model = base
    scores = LikelihoodScorer("ifd", source, cfg, tok)(PROMPTS, REPLIES)
    for prompt, reply, score in zip(PROMPTS, REPLIES, scores, strict=True):
        ratio = loss_by_hand(model, tok, prompt, reply) / loss_by_hand(model, tok, "", reply)
        expected = ratio if ratio < 1 else 1 - ratio
        assert math.isclose(score, expected, rel_tol=1e-4, abs_tol=1e-5)
        assert (score > 0) == (ratio < 1), "a ratio of 1 or more scores at most 0, below every helped row"


def test_the_model_loads_on_the_first_call_only(base):
    source, cfg, tok, _ = base
    scorer = LikelihoodScorer("loss", source, cfg, tok)
    assert scorer.model is None, "a stage whose scores are all cached never loads it"
    scorer(PROMPTS[:1], REPLIES[:1])
    assert scorer.model is not None
