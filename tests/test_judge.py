"""Win rate over the parent stage: the built-in checker and a user's judge function by import path."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError
from posttrain.evaluate import win_rate

MINE = [
    {"prompt": "a", "reply": "1", "correct": True},
    {"prompt": "b", "reply": "2", "correct": False},
    {"prompt": "c", "reply": "3", "correct": True},
]
PARENT = [
    {"prompt": "a", "reply": "9", "correct": False},
    {"prompt": "b", "reply": "8", "correct": False},
    {"prompt": "c", "reply": "3", "correct": True},
]


def test_exact_match_judge_counts_wins_and_ties():
    assert win_rate("exact_match", MINE, PARENT) == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_user_judge_is_called_with_prompts_and_both_replies(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "calls = []\n"
        "def longer(prompts, replies, parent_replies):\n"
        "    calls.append((prompts, replies, parent_replies))\n"
        "    return [1.0 if int(r) > int(p) else 0.0 for r, p in zip(replies, parent_replies)]\n"
        "def wrong_shape(prompts, replies, parent_replies):\n"
        "    return 0.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert win_rate("my_judges:longer", MINE, PARENT) == pytest.approx(0.0)
    import my_judges

    assert my_judges.calls == [(["a", "b", "c"], ["1", "2", "3"], ["9", "8", "3"])]
    with pytest.raises(ConfigError, match="eval.judge my_judges:wrong_shape: returned float, expected 3 scores"):
        win_rate("my_judges:wrong_shape", MINE, PARENT)
    with pytest.raises(ConfigError, match="eval.judge: cannot import 'my_judges:missing'"):
        win_rate("my_judges:missing", MINE, PARENT)


def test_no_common_prompts_gives_no_win_rate():
    assert win_rate("exact_match", MINE, [{"prompt": "z", "reply": "", "correct": False}]) is None
