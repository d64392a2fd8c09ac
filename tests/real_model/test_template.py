"""The real tokenizer under model=smollm2_135m's chat template: the assistant mask (what SFT's
assistant-only loss trains) covers exactly each reply and the <|im_end|> that ends it."""

from __future__ import annotations

import pytest

from posttrain import models
from posttrain.plan import load_config
from tests.conftest import TWO_TURNS, assistant_tokens, compose_tree
from tests.real_model.conftest import RECIPE

pytestmark = pytest.mark.real_model


def spans(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_the_mask_covers_each_reply_and_its_im_end(real_folder):
    tok = models.load_tokenizer(str(real_folder), load_config(compose_tree([RECIPE])).model)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>") and models.marks_assistant_tokens(tok)
    enc = tok.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    replies = [m["content"] for m in TWO_TURNS if m["role"] == "assistant"]
    assert len(spans(mask)) == len(replies)
    for (start, end), reply in zip(spans(mask), replies, strict=True):
        assert ids[start:end] == [*tok.encode(reply, add_special_tokens=False), tok.eos_token_id]
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")  # the header is not trained
    assert tok.decode(assistant_tokens(tok, TWO_TURNS)) == "5<|im_end|>8<|im_end|>"
