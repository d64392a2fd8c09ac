"""Run the stage chain of a validated config: base model -> stage -> stage -> summary.

Each stage starts from its parent's artifact folder (`init_from`), trains with its TRL
trainer, is evaluated, and is saved as an artifact whose manifest is written last.

    from posttrain.pipeline import run_pipeline   # run_pipeline(load_config(tree))
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain import artifacts, models
from posttrain.artifacts import Artifact
from posttrain.config import Config, ConfigError, EvalConfig, StageConfig
from posttrain.data.builtin import write_tasks
from posttrain.data.load import StageData, load_stage_data
from posttrain.plots import plot_curves
from posttrain.stages import STAGES
from posttrain.stages.base import TrainerInputs, lora_config, metrics_logger, training_args
from posttrain.summary import format_table

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def log(message: str) -> None:
    print(f"[posttrain] {message}", flush=True)


# --- data -------------------------------------------------------------------------------


def _uses_builtin(cfg: Config) -> bool:
    return any(s.data.path.startswith("builtin:") for s in cfg.stages.values())


def load_all_data(cfg: Config) -> dict[str, StageData]:
    builtin_folder = Path()
    if _uses_builtin(cfg):
        spec = cfg.data.builtin
        builtin_folder = write_tasks(spec, cfg.run.cache_path / "data" / f"builtin-{spec.fingerprint()}")
    return {
        name: load_stage_data(stage.data, STAGES[stage.method].data_kind, builtin_folder, cfg.run.seed)
        for name, stage in cfg.stages.items()
    }


def eval_conversations(cfg: Config, data: dict[str, StageData]) -> Dataset | None:
    """Held-out conversations for exact match and response loss: the first SFT stage's, else
    the first preference stage's prompts with their chosen replies."""
    from datasets import Dataset

    for name, stage in cfg.stages.items():
        if STAGES[stage.method].data_kind == "sft" and data[name].eval is not None:
            held_out = data[name].eval
            return held_out if "messages" in held_out.column_names else None
    for name in cfg.stages:
        held_out = data[name].eval
        if held_out is not None and "chosen" in held_out.column_names:
            return Dataset.from_dict({"messages": [r["prompt"] + r["chosen"] for r in held_out]})
    return None


# --- evaluation --------------------------------------------------------------------------


def evaluate_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset | None, eval_cfg: EvalConfig
) -> tuple[dict[str, float], list[dict]]:
    """Response loss and exact match (with every reply) on the held-out conversations."""
    from posttrain.evaluate import accuracy_by_task, exact_match, response_loss

    if rows is None:
        return {}, []
    metrics: dict[str, float] = {}
    replies: list[dict] = []
    if models.marks_assistant_tokens(tokenizer):
        metrics["response_loss"] = response_loss(model, tokenizer, rows, eval_cfg)
    if eval_cfg.exact_match:
        metrics["exact_match"], replies = exact_match(model, tokenizer, rows, eval_cfg)
        metrics.update(accuracy_by_task(replies))
    return metrics, replies


# --- one stage ---------------------------------------------------------------------------


def train_stage(
    name: str, stage: StageConfig, cfg: Config, parent: Artifact, data: StageData, tokenizer, stage_dir: Path
) -> tuple[PreTrainedModel, dict[str, float]]:
    """Train one stage from `parent`; return the trained (LoRA-merged) model and its trainer metrics."""
    spec = STAGES[stage.method]
    model = models.load_model(parent.source, cfg.model)
    peft_config = lora_config(cfg)
    # With LoRA the reference is the policy with its adapter disabled: no second copy.
    ref_model = models.load_model(parent.source, cfg.model) if spec.uses_reference and peft_config is None else None
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "metrics.jsonl").unlink(missing_ok=True)  # left by an attempt that did not finish
    trainer = spec.make_trainer(
        TrainerInputs(
            cfg=stage,
            model=model,
            ref_model=ref_model,
            tokenizer=tokenizer,
            train_dataset=data.train,
            eval_dataset=data.eval,
            args=training_args(stage, cfg, stage_dir),
            peft_config=peft_config,
            callbacks=[metrics_logger(stage_dir / "metrics.jsonl")],
        )
    )
    result = trainer.train()
    metrics: dict[str, float] = {**result.metrics, "train_steps": result.global_step}
    if data.eval is not None:
        metrics.update(trainer.evaluate())
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    del trainer, ref_model
    return trained, metrics


def save_stage(
    name: str,
    stage: StageConfig,
    cfg: Config,
    model: PreTrainedModel,
    tokenizer,
    parent: Artifact,
    data: StageData,
    metrics: dict,
    started: float,
    stage_dir: Path,
) -> None:
    """Save model + tokenizer and the training curves, then the manifest (last, atomically)."""
    model.save_pretrained(stage_dir, safe_serialization=True)
    tokenizer.save_pretrained(stage_dir)
    plot_curves(stage_dir / "metrics.jsonl", stage_dir / "curves.png", f"{name} ({stage.method})")
    manifest = {
        "status": "complete",
        "stage": name,
        "method": stage.method,
        "config": dataclasses.asdict(stage),
        "model": dataclasses.asdict(cfg.model),
        "peft": dataclasses.asdict(cfg.peft),
        "parent": {"name": parent.name, "source": parent.source},
        "data": {
            "origin": data.origin,
            "train_fingerprint": getattr(data.train, "_fingerprint", None),
            "train_rows": len(data.train),
            "eval_rows": len(data.eval) if data.eval is not None else 0,
        },
        "versions": artifacts.library_versions(),
        "metrics": metrics,
        "started": started,
        "finished": time.time(),
    }
    artifacts.write_json_atomic(stage_dir / artifacts.MANIFEST, manifest)


# --- the chain ---------------------------------------------------------------------------


def check_output_dir(cfg: Config) -> None:
    """Completed artifacts are never overwritten: refuse a run folder that already holds one."""
    for name in cfg.stages:
        if artifacts.is_complete(cfg.run.output_path / name):
            raise ConfigError(
                f"run.output_dir: {cfg.run.output_path} already holds a complete stage {name!r}; "
                "choose a new run.output_dir"
            )


def check_chat_template(cfg: Config, tokenizer, source: str) -> None:
    """Assistant-only loss needs a template that marks assistant tokens: never train on prompts silently."""
    for name, stage in cfg.stages.items():
        if getattr(stage, "assistant_only_loss", False) and not models.marks_assistant_tokens(tokenizer):
            raise ConfigError(
                f"{name}.assistant_only_loss: the chat template of {source!r} cannot mark assistant tokens "
                "(no {% generation %} block); set model.chat_template (chatml, zephyr, llama3) or "
                f"{name}.assistant_only_loss=false"
            )


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Run every stage; return the summary (also written to `<output_dir>/summary.json`)."""
    from transformers import set_seed

    check_output_dir(cfg)
    out = cfg.run.output_path
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.run.seed)
    t0 = time.time()
    base_source = models.base_model_source(cfg.model, cfg.run.cache_path)
    tokenizer = models.load_tokenizer(base_source, cfg.model)
    check_chat_template(cfg, tokenizer, base_source)
    log("loading data")
    data = load_all_data(cfg)
    eval_rows = eval_conversations(cfg, data)
    timings = {"setup": time.time() - t0}

    log(f"evaluating base model {base_source}")
    first_stage = next(iter(cfg.stages.values()))
    t = time.time()
    base_model = models.load_model(base_source, cfg.model)
    base_metrics, base_replies = evaluate_model(base_model, tokenizer, eval_rows, first_stage.eval)
    del base_model
    timings["eval:base"] = time.time() - t
    results = {"base": {"method": "base", "metrics": base_metrics, "path": base_source}}
    replies = {"base": base_replies}

    done: dict[str, Artifact] = {"base": Artifact("base", base_source)}
    previous = done["base"]
    for name, stage in cfg.stages.items():
        parent = previous if stage.init_from == "previous" else done[stage.init_from]
        stage_dir = out / name
        log(f"stage {name} ({stage.method}) starts from {parent.name}; rows: {len(data[name].train)} train")
        started = time.time()
        model, metrics = train_stage(name, stage, cfg, parent, data[name], tokenizer, stage_dir)
        timings[f"train:{name}"] = time.time() - started
        t = time.time()
        eval_metrics, replies[name] = evaluate_model(model, tokenizer, eval_rows, stage.eval)
        metrics.update(eval_metrics)
        timings[f"eval:{name}"] = time.time() - t
        t = time.time()
        save_stage(name, stage, cfg, model, tokenizer, parent, data[name], metrics, started, stage_dir)
        timings[f"save:{name}"] = time.time() - t
        results[name] = {"method": stage.method, "metrics": metrics, "path": str(stage_dir)}
        log(f"stage {name} complete: {stage_dir}")
        done[name] = previous = Artifact(name, str(stage_dir))
        del model
        gc.collect()

    summary = {
        "stages": results,
        "samples": _side_by_side(replies, first_stage.eval.num_samples),
        "timings_s": timings,
        "total_s": time.time() - t0,
    }
    artifacts.write_json_atomic(out / "summary.json", summary)
    print(format_table(cfg, results))
    log(f"done in {summary['total_s']:.0f}s; summary: {out / 'summary.json'}")
    return summary


def _side_by_side(replies: dict[str, list[dict]], count: int) -> list[dict]:
    """The first `count` held-out prompts with every stage's greedy reply."""
    rows = []
    for i, record in enumerate(replies.get("base", [])[:count]):
        row = {"prompt": record["prompt"], "reference": record["reference"]}
        row.update({stage: recs[i]["reply"] for stage, recs in replies.items() if i < len(recs)})
        rows.append(row)
    return rows
