"""`per_device_train_batch_size: auto` (memory.auto_micro_batch): the largest micro-batch whose
model states and activations fit a given device memory, the global batch kept by accumulation,
checkpointing only when nothing fits without it; chosen at plan time and printed by the plan."""

from __future__ import annotations

import pytest
import yaml

from posttrain import cli, memory
from posttrain.cli import compose_tree
from posttrain.config import ConfigError, resolve_batches
from posttrain.plan import load_config, plan_text, resolve_auto_batches
from posttrain.stage_cache import stage_keys
from tests.conftest import ANY_MODEL

GiB = 2**30
# Llama-3.2-1B SFT at 4096 tokens, 64 sequences per step (registry shape, nothing downloaded)
ONE_B = [ANY_MODEL, "model=llama3_2_1b", "sft.max_length=4096", "sft.global_batch_size=64", "align=none"]


def auto(capacity: float, *overrides: str, world: int = 1):
    cfg = load_config(compose_tree([*ONE_B, *overrides]))  # a number first: resolved below, not from this machine
    stage = cfg.stages["sft"]
    stage.per_device_train_batch_size = "auto"
    micro, why = memory.auto_micro_batch("sft", stage, cfg, "sft", capacity, world)
    return micro, why


def test_worked_example_on_an_h100_and_an_h200():
    # by hand: 1.236e9 parameters x 16 bytes (bf16 compute, fp32 master weights and Adam) = 18.4 GiB;
    # activations per token 16 layers x (26 x 2048 + 8 x 8192) + 10 x 128256 (logits) = 3.18 MB,
    # 12.1 GiB per 4096-token sequence. 85% of 80 GiB = 68 GiB: (68 - 18.4) / 12.1 = 4.1 -> 4;
    # 85% of 141 GiB = 119.9 GiB: 8.4 -> 8
    assert auto(80 * GiB)[0] == 4
    assert auto(141 * GiB)[0] == 8
    micro, why = auto(80 * GiB)
    assert "without activation checkpointing" in why and "x 16 accumulation" in why and "keeps 64" in why


def test_more_memory_never_gives_a_smaller_micro_batch_and_each_divides_the_batch():
    found = [auto(gib * GiB)[0] for gib in (40, 48, 64, 80, 96, 141, 192, 400, 2000)]
    assert found == sorted(found)
    assert all(64 % micro == 0 for micro in found) and found[-1] == 64  # at most the whole batch


def test_checkpointing_only_when_nothing_fits_without_it():
    # 24 GiB: 20.4 usable; fp32 master states leave 2 GiB, too little even checkpointed (5.6 GiB a sequence)
    with pytest.raises(ConfigError, match=r"sft.per_device_train_batch_size: auto: not even 1 sequence of 4096 tokens"):
        auto(24 * GiB)
    # bf16 weights and 8-byte stochastic-rounding AdamW: states 9.2 GiB; one sequence needs 12.1 GiB
    # without checkpointing, 5.6 GiB with it: 2 sequences, checkpointed
    micro, why = auto(24 * GiB, "sft.optimizer=adamw_sr_bf16")
    assert micro == 2 and "with activation checkpointing" in why
    # checkpointing forced off: nothing fits
    with pytest.raises(ConfigError, match="not even 1 sequence"):
        auto(24 * GiB, "sft.optimizer=adamw_sr_bf16", "sft.activation_checkpointing=false")


def test_processes_share_the_global_batch():
    # 8 processes: 8 rows each per step; the largest divisor of 8 that fits an 80 GiB GPU is 4
    assert auto(80 * GiB, world=8)[0] == 4
    assert auto(141 * GiB, world=8)[0] == 8


def test_preference_pairs_count_twice():
    cfg = load_config(compose_tree([*ONE_B, "align=dpo", "align.max_length=4096", "align.global_batch_size=64"]))
    stage = cfg.stages["align"]
    micro, _ = memory.auto_micro_batch("align", stage, cfg, "preference", 141 * GiB, 1)
    assert micro == 4  # chosen and rejected: 8 sequences, as SFT's 8


def test_auto_is_resolved_when_the_config_loads_and_printed_by_the_plan(tmp_path):
    tree = compose_tree(
        ["align.per_device_train_batch_size=auto", "align.global_batch_size=32", f"run.output_dir={tmp_path / 'run'}"]
    )
    cfg = load_config(tree)  # the tiny model in this machine's RAM: the whole per-process batch fits
    align = cfg.stages["align"]
    assert align.per_device_train_batch_size == 32 and align.gradient_accumulation_steps == 1
    assert "micro-batch auto: 32 x" in plan_text(cfg, stage_keys(cfg))


def test_a_given_memory_sets_micro_batch_and_accumulation():
    tree = compose_tree([*ONE_B, "sft.per_device_train_batch_size=8"])
    cfg = load_config(tree)
    cfg.stages["sft"].per_device_train_batch_size = "auto"
    resolve_auto_batches(cfg, capacity=80 * GiB)
    resolve_batches(cfg.stages, 1)
    sft = cfg.stages["sft"]
    assert (sft.per_device_train_batch_size, sft.gradient_accumulation_steps) == (4, 16)


def test_workers_read_the_chosen_number_from_the_frozen_config(tmp_path):
    from omegaconf import OmegaConf

    overrides = ["align.per_device_train_batch_size=auto", "align.global_batch_size=32", f"run.output_dir={tmp_path}"]
    tree = OmegaConf.create(compose_tree(overrides))
    _, container = cli.load(tree)
    assert container["align"]["per_device_train_batch_size"] == 32
    assert yaml.safe_load(yaml.safe_dump(container))["align"]["per_device_train_batch_size"] == 32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["align.per_device_train_batch_size=auto"],
            "align.per_device_train_batch_size: auto needs align.global_batch_size",
        ),
        (["align.per_device_train_batch_size=big"], "align.per_device_train_batch_size: 'big' is not a number or auto"),
    ],
)
def test_bad_auto_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(compose_tree(overrides))
