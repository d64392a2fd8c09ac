"""Run the stage chain of a validated config: base model -> stage -> stage -> summary.

Each stage starts from its parent's artifact folder (`init_from`), trains with its TRL
trainer, is evaluated, and is saved as an artifact whose manifest is written last.

    from posttrain.pipeline import run_pipeline   # run_pipeline(load_config(tree))
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain import artifacts, models, stage_cache
from posttrain.artifacts import Artifact
from posttrain.config import GATE_METRICS, Config, ConfigError, EvalConfig, StageConfig
from posttrain.data.builtin import write_tasks
from posttrain.data.load import StageData, load_stage_data
from posttrain.locks import FileLock
from posttrain.plots import plot_curves
from posttrain.preemption import Preempted, PreemptionGuard
from posttrain.stages import STAGES
from posttrain.stages.base import (
    TrainerInputs,
    lora_config,
    metrics_logger,
    training_args,
    use_stage_progress_bar,
)
from posttrain.summary import format_samples, format_table
from posttrain.tracking import StageTracker

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
    if eval_cfg.exact_match or eval_cfg.judge:  # a judge compares generated replies too
        score, replies = exact_match(model, tokenizer, rows, eval_cfg)
        if eval_cfg.exact_match:
            metrics["exact_match"] = score
            metrics.update(accuracy_by_task(replies))
    return metrics, replies


# --- one stage ---------------------------------------------------------------------------


@dataclass
class StageRun:
    """One stage of this run: its config, key, parent, and the folder its artifact lives in."""

    name: str
    stage: StageConfig
    key: str
    parent: Artifact
    data: StageData
    folder: Path
    checkpoint: Path | None = None


def train_stage(
    run: StageRun, cfg: Config, tokenizer, guard: PreemptionGuard, callbacks: list
) -> tuple[PreTrainedModel | None, dict[str, float]]:
    """Train one stage from its parent (or its checkpoint); return the trained, LoRA-merged model
    and the trainer's metrics, or (None, {}) when a preemption signal stopped it at a checkpoint."""
    spec = STAGES[run.stage.method]
    model = models.load_model(run.parent.source, cfg.model)
    peft_config = lora_config(cfg)
    # With LoRA the reference is the policy with its adapter disabled: no second copy.
    use_ref = spec.uses_reference and peft_config is None
    ref_model = models.load_model(run.parent.source, cfg.model) if use_ref else None
    trainer = spec.make_trainer(
        TrainerInputs(
            cfg=run.stage,
            model=model,
            ref_model=ref_model,
            tokenizer=tokenizer,
            train_dataset=run.data.train,
            eval_dataset=run.data.eval,
            args=training_args(run.stage, cfg, run.folder),
            peft_config=peft_config,
            callbacks=[metrics_logger(run.folder / "metrics.jsonl"), guard.callback(), *callbacks],
        )
    )
    use_stage_progress_bar(trainer, run.name)
    result = trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    if guard.requested and result.global_step < trainer.state.max_steps:
        return None, {}  # stopped at a checkpoint; a signal after the last step lets the stage finish
    metrics: dict[str, float] = {**result.metrics, "train_steps": result.global_step}
    if run.checkpoint is not None:
        metrics["train_loss"] = whole_run_train_loss(trainer.state.log_history, run.checkpoint, result)
    if run.data.eval is not None:
        metrics.update(trainer.evaluate())
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    del trainer, ref_model
    return trained, metrics


def whole_run_train_loss(log_history: list[dict], checkpoint: Path, result) -> float:
    """The mean loss over every step of a resumed stage, as an uninterrupted run reports it.

    transformers averages only the steps after the resume; the steps before it come from the
    logged losses (each the mean of its logging interval), exact when the checkpoint step is
    a multiple of logging_steps.
    """
    resumed_at = int(checkpoint.name.rsplit("-", 1)[1])
    total, covered = 0.0, 0
    for record in log_history:
        if "loss" in record and covered < record["step"] <= resumed_at:
            total += record["loss"] * (record["step"] - covered)
            covered = record["step"]
    if 0 < covered < resumed_at:  # steps after the last log before the checkpoint: their mean is unknown
        total += total / covered * (resumed_at - covered)
    after = result.global_step - resumed_at
    return (total + result.training_loss * after) / max(result.global_step, 1)


def save_model(run: StageRun, model: PreTrainedModel, tokenizer) -> None:
    """Model, tokenizer and training curves; a failed write (full disk) is one clear error."""
    from safetensors import SafetensorError

    try:
        model.save_pretrained(run.folder, safe_serialization=True)
        tokenizer.save_pretrained(run.folder)
        plot_curves(run.folder / "metrics.jsonl", run.folder / "curves.png", f"{run.name} ({run.stage.method})")
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise artifacts.ArtifactError(
            f"saving stage {run.name} to {run.folder} failed: {reason}; it is not marked complete and "
            "earlier stages are intact: free space (or fix the folder) and re-run the same command"
        ) from None


def stage_manifest(run: StageRun, cfg: Config, status: str, **fields) -> dict[str, Any]:
    """Everything needed to trust (and reproduce) an artifact: config, lineage, data, versions."""
    return {
        "status": status,
        "stage": run.name,
        "method": run.stage.method,
        "key": run.key,
        "content": stage_cache.stage_content(run.stage, cfg),
        "config": dataclasses.asdict(run.stage),
        "parent": {"name": run.parent.name, "key": run.parent.key, "source": run.parent.source},
        "data": {
            "origin": run.data.origin,
            "fingerprint": stage_cache.data_fingerprint(run.stage.data, cfg.data.builtin),
            "train_rows": len(run.data.train),
            "eval_rows": len(run.data.eval) if run.data.eval is not None else 0,
        },
        **artifacts.provenance(),
        **fields,
    }


def prepare_folder(run: StageRun, cfg: Config) -> None:
    """A fresh folder for a new attempt; for a resumed one, drop what came after its checkpoint."""
    own = cfg.run.output_path / run.name
    if run.checkpoint is None:
        if own.is_symlink():
            own.unlink()
        elif own.exists():
            shutil.rmtree(own)  # an unfinished attempt: place_stage never trains over a complete one
        own.mkdir(parents=True)
        return
    step = int(run.checkpoint.name.rsplit("-", 1)[1])
    for path in (run.folder / "checkpoints").glob("checkpoint-*"):
        if path != run.checkpoint:
            shutil.rmtree(path)  # half-written, or older
    log_path = run.folder / "metrics.jsonl"
    if log_path.exists():
        records = []
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by the crash
                records.append(json.loads(line))
        kept = [r for r in records if r["step"] < step or (r["step"] == step and "loss" in r)]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    stage_cache.link_stage(own, run.folder)


def run_stage(
    run: StageRun, cfg: Config, tokenizer, eval_rows, guard: PreemptionGuard, index: stage_cache.StageIndex
) -> tuple[dict[str, float], list[dict], dict[str, float]]:
    """Train, evaluate and save one stage; the manifest says running, then interrupted/failed/complete."""
    prepare_folder(run, cfg)
    manifest_path = run.folder / artifacts.MANIFEST
    started = time.time()
    previous = artifacts.read_manifest(run.folder) if run.checkpoint else None
    attempts = [*(previous or {}).get("attempts", []), {"started": started, "resumed_from": run.checkpoint}]
    artifacts.write_json_atomic(manifest_path, stage_manifest(run, cfg, "running", attempts=attempts))
    index.register(run.key, run.folder)
    timings = {}
    tracked = stage_manifest(run, cfg, "running")
    tracker = StageTracker(cfg.logger, run.name, cfg.run.output_path, run.folder, tracked)
    try:
        with tracker:
            model, metrics = train_stage(run, cfg, tokenizer, guard, tracker.callbacks())
            timings[f"train:{run.name}"] = time.time() - started
            if model is None:
                checkpoint = artifacts.last_checkpoint(run.folder)
                manifest = stage_manifest(run, cfg, "interrupted", attempts=attempts, checkpoint=checkpoint)
                artifacts.write_json_atomic(manifest_path, manifest)
                raise Preempted(f"{guard.signal_name}: stage {run.name} saved {checkpoint}")
            t = time.time()
            eval_metrics, replies = evaluate_model(model, tokenizer, eval_rows, run.stage.eval)
            metrics.update(eval_metrics)
            tracker.log_final(metrics, int(metrics.get("train_steps", 0)))
            timings[f"eval:{run.name}"] = time.time() - t
        t = time.time()
        save_model(run, model, tokenizer)
        shutil.rmtree(run.folder / "checkpoints", ignore_errors=True)  # the final model supersedes them
        del model
        gc.collect()
        attempts[-1]["finished"] = time.time()
        manifest = stage_manifest(
            run,
            cfg,
            "complete",
            attempts=attempts,
            metrics=metrics,
            eval_key=stage_cache.eval_key(run.stage, cfg),
            replies=replies,
            files=artifacts.file_sizes(run.folder),
        )
        artifacts.write_json_atomic(manifest_path, manifest)
        timings[f"save:{run.name}"] = time.time() - t
        return metrics, replies, timings
    except (Preempted, KeyboardInterrupt):
        raise
    except BaseException as e:
        failed = stage_manifest(run, cfg, "failed", attempts=attempts, error=f"{type(e).__name__}: {e}"[:2000])
        with contextlib.suppress(OSError):
            artifacts.write_json_atomic(manifest_path, failed)
        raise


# --- the chain ---------------------------------------------------------------------------


def check_writable(folder: Path) -> None:
    """An unwritable or missing-parent run folder is a clear error before anything trains."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".posttrain-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write to {folder} ({e.strerror or e})") from None


def check_chat_template(cfg: Config, tokenizer, source: str) -> None:
    """Assistant-only loss needs a template that marks assistant tokens: never train on prompts silently."""
    for name, stage in cfg.stages.items():
        if getattr(stage, "assistant_only_loss", False) and not models.marks_assistant_tokens(tokenizer):
            raise ConfigError(
                f"{name}.assistant_only_loss: the chat template of {source!r} cannot mark assistant tokens "
                "(no {% generation %} block); set model.chat_template (chatml, zephyr, llama3) or "
                f"{name}.assistant_only_loss=false"
            )


def evaluate_base(cfg: Config, keys: dict[str, str], tokenizer, eval_rows, source: str):
    """Base-model metrics, cached per (base model, evaluation settings): a sweep evaluates it once."""
    first = next(iter(cfg.stages.values()))
    name = stage_cache.hash_json([keys["base"], stage_cache.eval_key(first, cfg)])
    path = cfg.run.cache_path / "evals" / f"base-{name}.json"
    if cfg.run.reuse and (cached := artifacts.read_json(path)) is not None:
        log(f"base model metrics reused from {path}")
        return cached["metrics"], cached["replies"]
    log(f"evaluating base model {source}")
    model = models.load_model(source, cfg.model)
    metrics, replies = evaluate_model(model, tokenizer, eval_rows, first.eval)
    artifacts.write_json_atomic(path, {"metrics": metrics, "replies": replies})
    return metrics, replies


def reused_stage(run: StageRun, cfg: Config, tokenizer, eval_rows) -> tuple[dict, list[dict]]:
    """A complete artifact's metrics; its held-out evaluation is redone if the evaluation settings changed."""
    manifest = artifacts.read_manifest(run.folder) or {}
    metrics, replies = dict(manifest.get("metrics", {})), manifest.get("replies", [])
    if manifest.get("eval_key") != stage_cache.eval_key(run.stage, cfg):
        log(f"stage {run.name}: evaluation settings changed, evaluating the reused model again")
        model = models.load_model(str(run.folder), cfg.model)
        eval_metrics, replies = evaluate_model(model, tokenizer, eval_rows, run.stage.eval)
        metrics.update(eval_metrics)
    return metrics, replies


def reuse_or_run(
    run: StageRun, cfg: Config, tokenizer, eval_rows, guard: PreemptionGuard, timings: dict
) -> tuple[str, dict, list[dict]]:
    """Reuse, resume or train one stage, holding its key's lock (a parallel sweep job waits)."""
    index = stage_cache.StageIndex(cfg.run.cache_path)

    def waiting(holder: str) -> None:
        log(f"stage {run.name}: waiting for {holder}, which is training the same stage")

    with FileLock(index.lock_path(run.key), f"stage {run.name}", wait=True, on_wait=waiting):
        placement = stage_cache.place_stage(run.name, run.key, cfg, index)
        run.folder, run.checkpoint = placement.folder, placement.checkpoint
        if placement.action == "reuse":
            stage_cache.link_stage(cfg.run.output_path / run.name, run.folder)
            log(f"stage {run.name} ({run.stage.method}): reusing complete artifact {run.folder}")
            return "reused", *reused_stage(run, cfg, tokenizer, eval_rows)
        how = f"resuming {run.checkpoint}" if run.checkpoint else f"starting from {run.parent.name}"
        log(f"stage {run.name} ({run.stage.method}) {how}; rows: {len(run.data.train)} train")
        metrics, replies, stage_timings = run_stage(run, cfg, tokenizer, eval_rows, guard, index)
        timings.update(stage_timings)
        log(f"stage {run.name} complete: {run.folder}")
        return ("resumed" if run.checkpoint else "trained"), metrics, replies


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Run every stage; return the summary (also written to `<output_dir>/summary.json`).

    Complete stages with the same key are reused, an interrupted one resumes from its
    checkpoint, SIGTERM/SIGUSR1 stop at a checkpoint and raise Preempted.
    """
    from transformers import set_seed

    out = cfg.run.output_path
    check_writable(out)
    keys = stage_cache.stage_keys(cfg)
    stage_cache.check_run_folder(cfg, keys)
    set_seed(cfg.run.seed)
    t0 = time.time()
    with PreemptionGuard() as guard:
        base_source = models.base_model_source(cfg.model, cfg.run.cache_path)
        tokenizer = models.load_tokenizer(base_source, cfg.model)
        check_chat_template(cfg, tokenizer, base_source)
        log("loading data")
        data = load_all_data(cfg)
        eval_rows = eval_conversations(cfg, data)
        timings = {"setup": time.time() - t0}

        t = time.time()
        base_metrics, base_replies = evaluate_base(cfg, keys, tokenizer, eval_rows, base_source)
        timings["eval:base"] = time.time() - t
        results = {"base": {"method": "base", "status": "base", "metrics": base_metrics, "path": base_source}}
        replies = {"base": base_replies}

        gate_error = None
        done: dict[str, Artifact] = {"base": Artifact("base", base_source, keys["base"])}
        previous = done["base"]
        for name, stage in cfg.stages.items():
            guard.check(f"before stage {name}")
            parent = previous if stage.init_from == "previous" else done[stage.init_from]
            run = StageRun(name, stage, keys[name], parent, data[name], out / name)
            status, metrics, replies[name] = reuse_or_run(run, cfg, tokenizer, eval_rows, guard, timings)
            if stage.eval.judge:
                metrics = {**metrics, **judged(name, stage, parent.name, replies)}
            results[name] = {"method": stage.method, "status": status, "metrics": metrics, "path": str(run.folder)}
            done[name] = previous = Artifact(name, str(run.folder), run.key)
            if missed := missed_gate(name, stage, metrics):
                gate_error = f"{missed}; the chain stops after {name} (its model is complete in {run.folder})"
                break

    first_stage = next(iter(cfg.stages.values()))
    summary = {
        "status": f"stopped: {gate_error}" if gate_error else "complete",
        "stages": results,
        "samples": _side_by_side(replies, first_stage.eval.num_samples),
        "timings_s": timings,
        "total_s": time.time() - t0,
    }
    artifacts.write_json_atomic(out / "summary.json", summary)
    (out / "samples.md").write_text(format_samples(summary["samples"]))
    print(format_table(cfg, results))
    log(f"done in {summary['total_s']:.0f}s; summary: {out / 'summary.json'}")
    if gate_error:
        raise artifacts.GateError(gate_error)
    return summary


def judged(name: str, stage: StageConfig, parent: str, replies: dict[str, list[dict]]) -> dict[str, float]:
    """win_rate_vs_parent by the stage's judge, when both it and its parent generated replies."""
    from posttrain.evaluate import win_rate

    rate = win_rate(stage.eval.judge, replies.get(name, []), replies.get(parent, []))
    if rate is None:
        log(f"stage {name}: no win rate: {parent} has no replies to the same prompts (set {parent}.eval.judge too)")
        return {}
    log(f"stage {name}: win rate over {parent} by {stage.eval.judge}: {rate:.3f}")
    return {"win_rate_vs_parent": rate}


def missed_gate(name: str, stage: StageConfig, metrics: dict[str, float]) -> str | None:
    """The first bound of `stage.gate` that the stage's metrics miss, in words, or None."""
    for bound, limit in stage.gate.bounds().items():
        value = metrics.get(GATE_METRICS[bound])
        if value is None:
            return f"{name}.gate.{bound}: the stage reported no {GATE_METRICS[bound]}"
        lower = bound.startswith("min_")
        if (value < limit) if lower else (value > limit):
            metric, relation = GATE_METRICS[bound], "<" if lower else ">"
            return f"stage {name} missed its gate: {metric} {value:.4g} {relation} {name}.gate.{bound}={limit:g}"
    return None


def _side_by_side(replies: dict[str, list[dict]], count: int) -> list[dict]:
    """The first `count` held-out prompts with every stage's greedy reply."""
    rows = []
    for i, record in enumerate(replies.get("base", [])[:count]):
        row = {"prompt": record["prompt"], "reference": record["reference"]}
        row.update({stage: recs[i]["reply"] for stage, recs in replies.items() if i < len(recs)})
        rows.append(row)
    return rows
