"""DeepSpeed's json from the `deepspeed` group: each option agrees with the training arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.cli import compose_tree
from posttrain.deepspeed_config import deepspeed_json
from posttrain.plan import load_config
from tests.conftest import REPO

HOSTFILE = REPO / "launch" / "hostfile.example"


def config(*overrides: str, tmp_path: Path | None = None):
    run = [f"run.output_dir={tmp_path / 'run'}"] if tmp_path else []
    return load_config(compose_tree([*run, *overrides]))


@pytest.mark.parametrize(
    ("option", "stage", "offload_optimizer", "offload_param"),
    [
        ("zero1", 1, False, False),
        ("zero2", 2, False, False),
        ("zero3", 3, False, False),
        ("zero2_offload", 2, True, False),
        ("zero3_offload", 3, True, True),
    ],
)
def test_each_deepspeed_option_becomes_a_json_that_agrees_with_the_training_arguments(
    option, stage, offload_optimizer, offload_param
):
    cfg = config(f"deepspeed={option}", "sft.per_device_train_batch_size=4", "sft.gradient_accumulation_steps=3")
    sft = cfg.stages["sft"]
    ds = deepspeed_json(cfg.deepspeed, sft, world=16, precision="bf16", hidden_size=128)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 16
    assert ds["gradient_clipping"] == sft.max_grad_norm
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload_optimizer
    assert ("offload_param" in zero) == offload_param
    assert zero["reduce_bucket_size"] == 128 * 128
    # DeepSpeed's own CPU Adam with offload, at the stage's learning rate; else the trainer's AdamW
    assert ("optimizer" in ds) == offload_optimizer
    if offload_optimizer:
        assert ds["optimizer"]["params"]["lr"] == sft.learning_rate
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "auto" not in str(ds), "every value written out when the hidden size is known"


def test_extra_deepspeed_keys_merge_over_what_posttrain_writes():
    cfg = config("deepspeed=zero2", "+deepspeed.extra.zero_optimization.allgather_bucket_size=5")
    ds = deepspeed_json(cfg.deepspeed, cfg.stages["sft"], world=2, precision="fp32")
    assert ds["zero_optimization"]["allgather_bucket_size"] == 5
    assert ds["zero_optimization"]["stage"] == 2  # the rest of the section stays
