"""Shared fixtures: a per-session cache (tiny model, generated data) and Hydra composition."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.cli import compose_tree  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]

# Never reach a hub or a tracker from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole session, so the tiny model and the data are built once."""
    return tmp_path_factory.mktemp("posttrain-cache")


# the default recipe's settings kept on a model other than the tiny one (tests of plans, memory and
# model families, not of what those settings learn)
ANY_MODEL = "run.tuned_for=null"

# A few-step SFT -> alignment on the tiny model: small enough for the default test run.
FAST = [
    "data.builtin.num_sft=256",
    "data.builtin.num_preference=128",
    "data.builtin.num_test=32",
    "sft.max_steps=12",
    "sft.per_device_train_batch_size=16",
    "sft.learning_rate=3e-3",
    "sft.logging_steps=2",
    "sft.eval.num_prompts=16",
    "align.max_steps=6",
    "align.per_device_train_batch_size=16",
    "align.learning_rate=3e-4",
    "align.logging_steps=1",
    "align.eval.num_prompts=16",
]


def posttrain_argv(*args: str, cache_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `posttrain <args>` on a given cache. PYTHONPATH puts this
    checkout first, for the workers a launcher starts too (not an installed posttrain elsewhere)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "POSTTRAIN_CACHE": str(cache_dir), "PYTHONPATH": path}
    return [sys.executable, "-m", "posttrain.cli", *args], env


def run_posttrain(*args: str, cache_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    argv, env = posttrain_argv(*args, cache_dir=cache_dir)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, **kwargs)


# a system message and two turns; replies "5" and "8"
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]


def assistant_tokens(tok, messages: list[dict]) -> list[int]:
    """The token ids the chat template marks as the assistant's (what assistant-only loss trains)."""
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]


def user_module(folder: Path, monkeypatch, name: str, source: str) -> Path:
    """`<folder>/<name>.py` written from `source` and importable afresh (not another test's copy)."""
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return folder
