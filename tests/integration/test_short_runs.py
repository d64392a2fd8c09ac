"""Short runs are short (issue 29): a stage with max_steps keeps the rows those steps read (a seeded
sample), before anything is computed on them; a stage without max_steps keeps every row."""

from __future__ import annotations

import json
import math
import re

import pytest

from posttrain.pipeline import load_data, run_pipeline
from posttrain.plan import load_config
from posttrain.report.data import format_report
from posttrain.stage_cache import stage_content
from posttrain.stages import STAGES, max_steps_rows
from tests.conftest import compose_tree

SMALL = [
    "data.builtin.num_sft=256",
    "data.builtin.num_preference=128",
    "data.builtin.num_test=8",
    "sft.eval.num_prompts=4",
    "sft.eval.num_loss_rows=4",
    "align.eval.num_prompts=4",
    "align.eval.num_loss_rows=4",
]


def config(tmp_path, cache_dir, *overrides: str):
    run = [f"run.output_dir={tmp_path / 'run'}", f"run.cache_dir={cache_dir}"]
    return load_config(compose_tree([*SMALL, *run, *overrides]))


def test_max_steps_keeps_a_seeded_sample_of_the_rows_its_steps_read(tmp_path, cache_dir):
    short = config(tmp_path, cache_dir, "align.max_steps=2", "align.per_device_train_batch_size=4")
    whole = config(tmp_path, cache_dir)
    every = load_data(whole, "align", whole.stages["align"], None, {})
    kept = load_data(short, "align", short.stages["align"], None, {})
    assert len(every.train) == 128 and "step_rows" not in every.report  # no max_steps: every row
    assert len(kept.train) == 8 and kept.report["train_rows"] == 8
    assert all(row in list(every.train) for row in kept.train)
    assert load_data(short, "align", short.stages["align"], None, {}).train.to_list() == kept.train.to_list()
    assert (kept.report["step_rows"], kept.report["mixed_rows"]) == (8, 128)
    assert format_report("align", kept.report).startswith("data for align: 8 train rows (of 128: what its max_steps")
    assert len(kept.eval) == len(every.eval) == 8  # the held-out rows are not capped


def test_the_cap_is_in_the_key_only_of_stages_with_max_steps(tmp_path, cache_dir):
    cfg = config(tmp_path, cache_dir, "align.max_steps=3", "align.per_device_train_batch_size=4")
    assert stage_content(cfg.stages["align"], cfg)["max_steps_rows"] == 12
    assert "max_steps_rows" not in stage_content(cfg.stages["sft"], cfg)
    packed = config(tmp_path, cache_dir, "sft.max_steps=3", "sft.packing=true")
    assert max_steps_rows(packed.stages["sft"], 1) is None  # rows per packed sequence: known after tokenizing


def test_dpo_with_max_steps_computes_reference_logps_of_those_rows_only(tmp_path, cache_dir, capfd):
    from datasets import Dataset

    overrides = ["sft=none", "align.init_from=base", "align.max_steps=2", "align.per_device_train_batch_size=4"]
    cfg = config(tmp_path, cache_dir, *overrides)
    assert run_pipeline(cfg)["status"] == "complete"
    logged = capfd.readouterr().out
    path = re.search(r"reference log-probs of the train rows (?:saved to|reused from) (\S+)", logged)[1]
    assert len(Dataset.from_parquet(path)) == 8
    manifest = json.loads((cfg.run.output_path / "align" / "manifest.json").read_text())
    assert manifest["data"]["train_rows"] == 8 and manifest["metrics"]["train_steps"] == 2
    assert "stage align (dpo) starting from base; rows: 8 train" in logged


def test_sft_with_max_steps_trains_on_exactly_the_kept_rows(tmp_path, cache_dir):
    cfg = config(tmp_path, cache_dir, "run.stages=[sft]", "sft.max_steps=2", "sft.per_device_train_batch_size=4")
    assert run_pipeline(cfg)["status"] == "complete"
    manifest = json.loads((cfg.run.output_path / "sft" / "manifest.json").read_text())
    assert manifest["data"]["train_rows"] == 8
    # 2 steps of 4 rows are one whole pass: the trainer's dataset held the 8 kept rows
    assert manifest["metrics"]["epoch"] == 1.0
    report = json.loads((cfg.run.output_path / "data_report.json").read_text())["sft"]
    assert (report["train_rows"], report["mixed_rows"]) == (8, 256)


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_steps=5, per_device_train_batch_size=8, num_generations=4),
        dict(max_steps=5, per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=3),
        dict(max_steps=5, per_device_train_batch_size=8, num_generations=4, steps_per_generation=4),
        dict(max_steps=7, per_device_train_batch_size=6, num_generations=3, steps_per_generation=2, num_iterations=2),
    ],
)
def test_grpo_keeps_the_prompts_its_steps_read_by_trls_own_sampler(settings, tmp_path):
    """TRL's GRPO sampler over the kept prompts: one pass holds max_steps optimizer steps, and a
    generation batch fewer would not."""
    from trl import GRPOConfig
    from trl.trainer.utils import RepeatSampler

    stage = STAGES["grpo"].config_cls(**settings)
    stage.validate("align")
    prompts = max_steps_rows(stage, 1)
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=stage.max_steps,
        per_device_train_batch_size=stage.per_device_train_batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps, num_generations=stage.num_generations,
        steps_per_generation=stage.steps_per_generation, num_iterations=stage.num_iterations,
    )  # fmt: skip
    per_generation = args.generation_batch_size // stage.num_generations

    def optimizer_steps(rows: int) -> int:
        sampler = RepeatSampler(
            range(rows), stage.num_generations, per_generation, stage.num_iterations * args.steps_per_generation
        )
        micro_steps = len(list(sampler)) // (stage.per_device_train_batch_size * args.steps_per_generation)
        return math.ceil(micro_steps / stage.gradient_accumulation_steps)

    assert prompts % per_generation == 0
    assert optimizer_steps(prompts) >= stage.max_steps > optimizer_steps(prompts - per_generation)
