"""Evaluation numbers come from real greedy generations: one reply checked by hand."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from posttrain import models
from posttrain.config import EvalConfig, ModelConfig
from posttrain.evaluate import accuracy_by_task, exact_match


@pytest.fixture(scope="module")
def model_and_tokenizer(cache_dir):
    cfg = ModelConfig()
    source = models.base_model_source(cfg, cache_dir)
    return models.load_model(source, cfg), models.load_tokenizer(source, cfg)


def _greedy_reply_by_hand(model, tok, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no batching or padding: append the most likely token until the end token."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    reply = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(ids).logits[0, -1].argmax())
            if next_id == tok.eos_token_id:
                break
            reply.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return tok.decode(reply, skip_special_tokens=True).strip()


def test_exact_match_scores_the_model_own_greedy_replies(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = ["What is 12 + 7?", "Reverse the letters: abcd", "Sort the letters: dcba"]
    by_hand = [_greedy_reply_by_hand(model, tok, p, max_new_tokens=8) for p in prompts]
    # the first two references are what the model says (correct), the last is not (wrong)
    references = [by_hand[0], by_hand[1], by_hand[2] + " and more"]
    rows = Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                for p, r in zip(prompts, references, strict=True)
            ],
            "task": ["add", "reverse", "sort"],
        }
    )
    # batches of 2 with left padding must give the same replies as one prompt at a time
    score, records = exact_match(model, tok, rows, EvalConfig(num_prompts=3, max_new_tokens=8, batch_size=2))
    assert [r["reply"] for r in records] == by_hand
    assert [r["correct"] for r in records] == [True, True, False]
    assert score == pytest.approx(2 / 3)
    assert accuracy_by_task(records) == {"exact_match/add": 1.0, "exact_match/reverse": 1.0, "exact_match/sort": 0.0}
