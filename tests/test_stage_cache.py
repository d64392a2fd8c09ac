"""Stage keys change exactly when a stage's result can change; the index only returns matching folders."""

from __future__ import annotations

import json

import pytest

from posttrain import artifacts
from posttrain.plan import load_config
from posttrain.stage_cache import StageIndex, config_changes, stage_keys
from tests.conftest import compose_tree


def keys(*overrides: str) -> dict[str, str]:
    return stage_keys(load_config(compose_tree(list(overrides))))


# keys of the recipes as they were before the config redesign: artifacts already cached under them
# must still be reused (a change here retrains every user's stages)
PINNED = {
    "recipe=tiny_sft_dpo": {"base": "50b7bc43d3fcf5ee", "sft": "05e15efcdd1941f0", "align": "3145344baabd13e2"},
    # tiny_sft_grpo's align key moved on purpose: its GRPO settings were tuned (conf/tuned/tiny_grpo.yaml),
    # then its max_steps=300 came to keep only the 2400 prompts those steps read (max_steps_rows)
    "recipe=tiny_sft_grpo": {"base": "50b7bc43d3fcf5ee", "sft": "192ec2e3a3613ac2", "align": "5ebedf7681617f6c"},
    "recipe=tiny_sft_onpolicy_dpo": {
        "base": "50b7bc43d3fcf5ee",
        "sft": "192ec2e3a3613ac2",
        "pairs": "a7245cc7b8f9f079",
        "align": "0f6d951d2ae7f233",
        "pairs2": "cec5339f39a970ce",
        "align2": "2df2e908a6d3318b",
    },
    "align=kto": {"base": "50b7bc43d3fcf5ee", "sft": "05e15efcdd1941f0", "align": "b9c61ce1d01cb08a"},
    "peft=lora": {"base": "50b7bc43d3fcf5ee", "sft": "b4ab9d017e1237e2", "align": "2c5a8b24f04d35f1"},
}


@pytest.mark.parametrize("override", PINNED)
def test_keys_are_the_ones_existing_caches_hold(override):
    assert keys(override) == PINNED[override]


def test_keys_are_stable_and_distinct():
    first = keys()
    assert first == keys()
    assert len(set(first.values())) == 3


def test_an_alignment_setting_changes_only_the_alignment_key():
    before, after = keys(), keys("align.beta=0.3")
    assert before["sft"] == after["sft"] and before["align"] != after["align"]


def test_an_sft_setting_changes_sft_and_everything_after_it():
    before, after = keys(), keys("sft.learning_rate=1e-4")
    assert before["base"] == after["base"]
    assert before["sft"] != after["sft"] and before["align"] != after["align"]


@pytest.mark.parametrize(
    "override",
    [
        "sft.logging_steps=7",
        "sft.eval.num_prompts=3",
        "sft.checkpoint_steps=9",
        "sft.per_device_eval_batch_size=3",
        "run.name=other",
        "run.output_dir=/tmp/elsewhere",
    ],
)
def test_settings_that_do_not_change_weights_keep_the_keys(override):
    assert keys(override) == keys()


@pytest.mark.parametrize(
    "override",
    [
        "run.seed=1",
        "model.tiny.hidden_size=32",
        "peft=lora",
        "data.builtin.num_sft=100",
        "data.sft.dedup=exact",
        "data.sft.max_rows=100",
        "data.sft.overlong=drop",
        # on, the speed options change the numbers (bf16 weights; other kernels and reductions);
        # off, they leave existing keys as they were (test_keys_are_the_ones_existing_caches_hold)
        "sft.optimizer=adamw_kahan_bf16",
        "sft.padding_free=true",
        "sft.compile=true",
    ],
)
def test_settings_that_change_weights_change_the_keys(override):
    assert keys(override)["sft"] != keys()["sft"]


def test_the_planned_number_of_processes_is_part_of_the_global_batch():
    assert keys("launcher=torchrun", "launcher.gpus=2")["sft"] != keys()["sft"]
    assert keys("launcher=torchrun", "launcher.gpus=1")["sft"] == keys()["sft"]


def test_data_file_content_is_part_of_the_key(tmp_path):
    data = tmp_path / "sft.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(row) + "\n")
    before = keys(f"data.sft.path={data}")
    data.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert keys(f"data.sft.path={data}")["sft"] != before["sft"]


def test_every_file_and_weight_of_a_mixture_is_part_of_the_key(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(row) + "\n")
    b.write_text(json.dumps(row) + "\n")

    def mixture(weight: int) -> dict[str, str]:
        return keys("data.sft.path=null", f"+data.sft.sources=[{{path: {a}}}, {{path: {b}, weight: {weight}}}]")

    before = mixture(1)
    assert mixture(2)["sft"] != before["sft"]
    b.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert mixture(1)["sft"] != before["sft"]


def test_config_changes_names_dotted_keys():
    old = {"stage": {"learning_rate": 1e-3, "beta": 0.1}, "seed": 0}
    new = {"stage": {"learning_rate": 1e-4, "beta": 0.1}, "seed": 1}
    assert config_changes(old, new) == ["seed", "stage.learning_rate"]


def test_index_returns_only_a_folder_that_still_holds_the_key(tmp_path):
    index = StageIndex(tmp_path / "cache")
    folder = tmp_path / "run" / "sft"
    assert index.lookup("abc") is None
    artifacts.write_json_atomic(folder / "manifest.json", {"status": "complete", "key": "abc"})
    index.register("abc", folder)
    assert index.lookup("abc") == folder
    artifacts.write_json_atomic(folder / "manifest.json", {"status": "complete", "key": "other"})
    assert index.lookup("abc") is None
