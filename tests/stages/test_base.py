"""Defaults chosen per machine: processes for tokenizing large datasets; speed options as training arguments."""

from __future__ import annotations

import os

import pytest

from posttrain.stages import STAGES
from posttrain.stages.base import PARALLEL_TOKENIZATION_ROWS, tokenization_processes

CORES = len(os.sched_getaffinity(0))


def stage(method: str, **trainer_args):
    return STAGES[method].config_cls(method=method, trainer_args=trainer_args)


@pytest.mark.skipif(CORES < 2, reason="one core: never a pool")
def test_large_datasets_are_tokenized_on_every_core_of_this_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    rows = PARALLEL_TOKENIZATION_ROWS
    assert tokenization_processes(STAGES["sft"], stage("sft"), rows) == {"dataset_num_proc": min(CORES, 8)}
    assert tokenization_processes(STAGES["dpo"], stage("dpo"), rows) == {"dataset_num_proc": min(CORES, 8)}
    # small datasets: one process (a pool costs more than it saves)
    assert tokenization_processes(STAGES["sft"], stage("sft"), rows - 1) == {}
    # the user's own setting wins; GRPO's trainer has no such setting; data stages train nothing
    assert tokenization_processes(STAGES["sft"], stage("sft", dataset_num_proc=1), rows) == {}
    assert tokenization_processes(STAGES["grpo"], stage("grpo"), rows) == {}
    assert tokenization_processes(STAGES["pairs"], stage("pairs"), rows) == {}
    # as many ranks on this node as cores: each rank tokenizes alone
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(CORES))
    assert tokenization_processes(STAGES["sft"], stage("sft"), rows) == {}


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_fp32_master_weights_are_evaluated_and_saved_in_the_compute_dtype(monkeypatch, tmp_path, cache_dir):
    """As on a GPU with bf16 units (bf16 autocast, here on the CPU): a full fine-tune trains fp32
    weights and hands on a plain bf16 model, as a bf16 trainer would; LoRA, float32 and bfloat16
    save as trained, float16 as fp16."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain import models
    from posttrain.pipeline import run_pipeline
    from posttrain.plan import load_config
    from posttrain.stage_model import saved_dtype
    from tests.conftest import compose_tree

    on_gpu = {"auto": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    monkeypatch.setattr(models, "compute_dtype", on_gpu.__getitem__)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(cache_dir))
    out = tmp_path / "run"
    overrides = [f"run.output_dir={out}", "align=none", "sft.max_steps=2", "sft.eval.num_prompts=4"]
    cfg = load_config(compose_tree(overrides))
    assert saved_dtype(cfg.stages["sft"], cfg) == torch.bfloat16
    run_pipeline(cfg)
    saved = load_file(str(out / "sft" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((out / "sft" / "config.json").read_text())["dtype"] == "bfloat16"
    base = AutoModelForCausalLM.from_pretrained(models.base_model_source(cfg.model, cfg.run.cache_path))
    assert base.dtype == torch.float32  # the tiny base is fp32: the bf16 comes from the stage
    changed = [k for k, v in base.state_dict().items() if k in saved and not torch.equal(v.bfloat16(), saved[k])]
    assert changed, "the saved model equals the base"
    for kept in (["peft=lora"], ["model.dtype=float32"], ["model.dtype=bfloat16"]):
        other = load_config(compose_tree([*overrides, *kept]))
        assert saved_dtype(other.stages["sft"], other) is None
    fp16 = load_config(compose_tree([*overrides, "model.dtype=float16"]))
    assert saved_dtype(fp16.stages["sft"], fp16) == torch.float16


def test_compile_and_liger_map_to_transformers_arguments(tmp_path):
    """`compile` and `liger` become TrainingArguments' torch_compile and use_liger_kernel; off,
    neither is passed (TRL warns about use_liger_kernel whatever its value)."""
    from posttrain.plan import load_config
    from posttrain.stages.base import training_args
    from tests.conftest import compose_tree

    cfg = load_config(compose_tree([f"run.output_dir={tmp_path}", "sft.compile=true", "align.compile=false"]))
    on = training_args(STAGES["sft"], cfg.stages["sft"], cfg, tmp_path)
    off = training_args(STAGES["dpo"], cfg.stages["align"], cfg, tmp_path)
    assert on["torch_compile"] is True and "torch_compile" not in off
    assert "use_liger_kernel" not in on and "use_liger_kernel" not in off
    cfg.stages["sft"].liger = True  # past the plan's check (CUDA, liger-kernel), as on a GPU machine
    assert training_args(STAGES["sft"], cfg.stages["sft"], cfg, tmp_path)["use_liger_kernel"] is True
