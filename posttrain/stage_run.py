"""One stage of a run: train it from its parent (or resume its checkpoint), evaluate it, save
it, and keep its manifest's status true at every point (running, interrupted, failed, complete).

    metrics, replies, timings = run_stage(StageRun(...), cfg, tokenizer, eval_rows, guard, index)
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

from posttrain import artifacts, distributed, models, optim, peft_handoff, stage_cache
from posttrain.artifacts import Artifact
from posttrain.config import Config, LoggerConfig, StageConfig, stage_peft
from posttrain.data.load import StageData
from posttrain.deepspeed_config import deepspeed_json, precision
from posttrain.distributed import log
from posttrain.evaluate import evaluate_model
from posttrain.optim import BF16_OPTIMIZERS
from posttrain.preemption import Preempted, PreemptionGuard
from posttrain.ref_logps import RefLogpsCache
from posttrain.rewards import load_rewards
from posttrain.stage_model import (
    build_policy,
    load_saved,
    merged,
    save_model,
    save_partitioned_lora,
    saved_dtype,
    trained_dtype,
)
from posttrain.stages import STAGES
from posttrain.stages.base import (
    DataStageInputs,
    TrainerInputs,
    metrics_logger,
    tokenization_processes,
    training_args,
    use_stage_progress_bar,
)
from posttrain.tracking import StageTracker

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class StageRun:
    """One stage of this run: its config, key, parent, and the folder its artifact lives in."""

    name: str
    stage: StageConfig
    key: str
    parent: Artifact
    data: StageData
    folder: Path
    # the hash of the stage's data settings and rows (part of `key`; recorded in its manifest)
    data_fingerprint: str
    checkpoint: Path | None = None
    # what a method with a reference compares the policy with (default: the parent)
    reference: Artifact | None = None
    # earlier rm stages of the chain, name -> folder (reward sources of online stages)
    reward_models: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def reference_artifact(self) -> Artifact:
        return self.reference or self.parent


def trainer_eval_rows(run: StageRun):
    """The held-out rows the trainer's own metrics (eval loss, reward accuracy) read: the first
    eval.num_loss_rows, as the response loss does (a reference pass over more is time for nothing)."""
    held_out = run.data.eval
    if held_out is None or len(held_out) <= run.stage.eval.num_loss_rows:
        return held_out
    return held_out.select(range(run.stage.eval.num_loss_rows))


def use_stage_optimizer(trainer, stage: StageConfig, args: dict[str, Any]) -> None:
    """A BF16 optimizer (posttrain/optim.py) for the trainer to build, with its parameter groups,
    scheduler and checkpoints; `adamw` leaves the trainer's own."""
    if stage.optimizer in BF16_OPTIMIZERS:
        trainer.optimizer_cls_and_kwargs = optim.optimizer_cls_and_kwargs(stage.optimizer, args)


def train_stage(
    run: StageRun, cfg: Config, tokenizer, guard: PreemptionGuard, callbacks: list
) -> tuple[PreTrainedModel | None, dict[str, float]]:
    """Train one stage from its parent (or its checkpoint); return the trained, LoRA-merged model
    (None on ranks other than 0 under ZeRO-3) and the trainer's metrics, or (None, {"stopped": True})
    when a preemption signal stopped it at a checkpoint."""
    from transformers import set_seed

    spec = STAGES[run.stage.method]
    args = training_args(STAGES[run.stage.method], run.stage, cfg, run.folder, run.parent.source)
    args |= tokenization_processes(spec, run.stage, len(run.data.train))
    zero3 = deepspeed_settings(run, cfg, args)
    rss_before_model = distributed.memory_mark() if cfg.run.rank_logs else None
    # loading, tokenizing the rows and the reference log-prob pass (TRL runs both when it builds the trainer)
    with guard.interruptible(f"stage {run.name}: loading the model, tokenizing and the reference pass"):
        # what is drawn at random (a new score head, a LoRA adapter) depends on the stage alone, not
        # on what ran before it in this process: a reused or resumed chain gives the same weights
        set_seed(cfg.run.seed)
        policy = build_policy(run, cfg, tokenizer)
        trainer = spec.make_trainer(
            TrainerInputs(
                cfg=run.stage,
                model=policy.model,
                ref_model=policy.ref_model,
                tokenizer=tokenizer,
                train_dataset=run.data.train,
                eval_dataset=trainer_eval_rows(run),
                args=args,
                peft_config=policy.peft_config,
                callbacks=[metrics_logger(run.folder / "metrics.jsonl"), guard.callback(), *callbacks],
                ref_logps=ref_logps_cache(run, cfg, guard) if spec.uses_reference else None,
                reward=stage_reward(run, cfg, tokenizer) if spec.uses_reward else None,
                guard=guard,
            )
        )
    guard.check(f"before stage {run.name} trained")  # several processes: every rank stops here together
    use_stage_optimizer(trainer, run.stage, args)
    use_stage_progress_bar(trainer, run.name)
    if cfg.run.rank_logs:
        distributed.rank_logger(trainer, run.folder, rss_before_model)
    if policy.adapters:
        peft_handoff.resume_new_adapter(trainer)
    result = trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    if guard.requested and result.global_step < trainer.state.max_steps:
        return None, {"stopped": True}  # at a checkpoint; a signal after the last step lets the stage finish
    metrics: dict[str, float] = {**result.metrics, "train_steps": result.global_step}
    if getattr(trainer, "ref_logps_seconds", 0.0):
        metrics["ref_logps_runtime"] = trainer.ref_logps_seconds
    if run.checkpoint is not None:
        metrics["train_loss"] = whole_run_train_loss(trainer.state.log_history, run.checkpoint, result)
    if trainer.eval_dataset is not None:
        log(f"stage {run.name}: held-out loss")
        with guard.interruptible(f"stage {run.name}: the held-out loss"):
            metrics.update(trainer.evaluate())
        guard.check(f"after stage {run.name}'s held-out loss")
    if spec.uses_reward:
        metrics.update(reward_trend(trainer.state.log_history))
    trained = trainer.model
    if zero3 is not None:
        # the weights are partitioned over the ranks: gathered into rank 0's save, then read back
        if stage_peft(run.stage, cfg.peft) == "none":
            trainer.save_model(str(run.folder))
        else:
            save_partitioned_lora(trained, policy, run, cfg)
        distributed.barrier()
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # later loads (this model, evaluation) are plain, not partitioned
        trained = load_saved(run, cfg, tokenizer) if distributed.is_main() else None
    elif stage_peft(run.stage, cfg.peft) != "none" and distributed.is_main():
        with guard.interruptible(f"stage {run.name}: merging its adapter", alone=True):
            trained = merged(trained, policy, run, cfg)
    del trainer, policy, zero3
    return trained, metrics


def stage_reward(run: StageRun, cfg: Config, tokenizer):
    stage = run.stage
    return load_rewards(
        stage.reward, stage.reward_weights, f"{run.name}.reward", run.reward_models, cfg.model, tokenizer
    )


def reward_trend(log_history: list[dict]) -> dict[str, float]:
    """The mean sampled reward of an online stage's first and last logging intervals."""
    rewards = [record["reward"] for record in log_history if "reward" in record]
    return {"train_reward_first": rewards[0], "train_reward": rewards[-1]} if rewards else {}


def make_stage_data(run: StageRun, cfg: Config, tokenizer, guard: PreemptionGuard) -> dict[str, float] | None:
    """A data stage's work, on rank 0 (the others wait): its metrics, or None when stopped."""
    metrics = None
    if distributed.is_main():
        try:
            with guard.interruptible(f"stage {run.name}: loading its model", alone=True):
                metrics = _make_data(run, cfg, tokenizer, guard)
        except Preempted:
            metrics = {"stopped": True}
    return distributed.agree(metrics)


def _make_data(run: StageRun, cfg: Config, tokenizer, guard: PreemptionGuard) -> dict[str, float]:
    spec = STAGES[run.stage.method]
    model = models.load_model(run.parent.source, cfg.model, pad_token_id=tokenizer.pad_token_id)
    inputs = DataStageInputs(
        cfg=run.stage,
        model=model,
        tokenizer=tokenizer,
        train_prompts=run.data.train,
        eval_prompts=run.data.eval,
        reward=stage_reward(run, cfg, tokenizer),
        folder=run.folder,
        source=run.parent.source,
        seed=cfg.run.seed,
        checkpoint=run.checkpoint,
        guard=guard,
    )
    metrics = spec.make_data(inputs)
    del model, inputs
    return {"stopped": True} if metrics is None else metrics


def deepspeed_settings(run: StageRun, cfg: Config, args: dict[str, Any]):
    """Put the stage's DeepSpeed json into its training arguments (and, from rank 0, into
    `<run>/launch/deepspeed-<stage>.json`). Under ZeRO-3 returns the object that must stay alive
    while the model loads, so `from_pretrained` partitions the weights as it reads them."""
    if cfg.deepspeed.stage is None:
        return None
    from transformers import AutoConfig

    hidden = getattr(AutoConfig.from_pretrained(run.parent.source), "hidden_size", None)
    world = distributed.world_size()
    args["deepspeed"] = deepspeed_json(cfg.deepspeed, run.stage, world, precision(args), hidden)
    if distributed.is_main():
        artifacts.write_json_atomic(cfg.run.output_path / "launch" / f"deepspeed-{run.name}.json", args["deepspeed"])
    if cfg.deepspeed.stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(args["deepspeed"])


def ref_logps_cache(run: StageRun, cfg: Config, guard: PreemptionGuard | None = None) -> RefLogpsCache:
    """Reference log-probs live beside the reference artifact (the base model's in the cache)."""
    reference = run.reference_artifact
    folder = Path(reference.source) / "ref_logps"
    if reference.name == "base":
        folder = cfg.run.cache_path / "ref_logps" / reference.key
    # a 4-bit (QLoRA) policy computes 4-bit reference log-probs
    quantized = stage_peft(run.stage, cfg.peft) == "qlora"
    dtypes = f"{trained_dtype(run.stage, cfg)}>{models.compute_dtype(cfg.model.dtype)}"
    settings = f"{dtypes}|{cfg.model.attn_implementation}|{'nf4' if quantized else 'full'}"
    return RefLogpsCache(folder, reference.key, settings, guard)


def whole_run_train_loss(log_history: list[dict], checkpoint: Path, result) -> float:
    """The mean loss over every step of a resumed stage, as an uninterrupted run reports it.

    transformers averages only the steps after the resume; the steps before it come from the
    logged losses (each the mean of its logging interval), exact when the checkpoint step is
    a multiple of logging_steps; with none logged before the checkpoint, the resumed steps' mean.
    """
    resumed_at = artifacts.checkpoint_step(checkpoint)
    total, covered = 0.0, 0
    for record in log_history:
        if "loss" in record and covered < record["step"] <= resumed_at:
            total += record["loss"] * (record["step"] - covered)
            covered = record["step"]
    if covered == 0:  # nothing was logged before the checkpoint: the resumed steps' mean stands for all
        return result.training_loss
    if covered < resumed_at:  # steps after the last log before the checkpoint: their mean is unknown
        total += total / covered * (resumed_at - covered)
    after = result.global_step - resumed_at
    return (total + result.training_loss * after) / max(result.global_step, 1)


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
            "fingerprint": run.data_fingerprint,
            "train_rows": len(run.data.train),
            "eval_rows": len(run.data.eval) if run.data.eval is not None else 0,
            "curation": run.data.report,
        },
        # how it was trained: the launcher and DeepSpeed settings (not part of the key: a stage
        # trained under ZeRO-2 is reused under ZeRO-3; the number of processes is in the key)
        "launch": {"launcher": cfg.launcher.name, "deepspeed": dataclasses.asdict(cfg.deepspeed)},
        **artifacts.provenance(),
        **fields,
    }


def complete(run: StageRun, cfg: Config, attempts: list, metrics: dict, eval_key=None, replies=None) -> dict:
    """The manifest of a saved stage; without `eval_key`, one not evaluated yet."""
    return stage_manifest(
        run,
        cfg,
        "complete",
        attempts=attempts,
        metrics=metrics,
        evaluated=eval_key is not None,
        eval_key=eval_key,
        replies=replies or [],
        files=artifacts.file_sizes(run.folder),
    )


def prepare_folder(run: StageRun, cfg: Config) -> None:
    """A fresh folder for a new attempt; for a resumed one, drop what came after its checkpoint."""
    own = cfg.run.output_path / run.name
    if run.checkpoint is None:
        if own.is_symlink():
            own.unlink()
        elif own.exists():
            artifacts.remove_folder(own)  # an unfinished attempt: place_stage never trains over a complete one
        own.mkdir(parents=True)
        return
    step = artifacts.checkpoint_step(run.checkpoint)
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
    """Train, evaluate and save one stage; the manifest says running, then interrupted/failed/complete.

    Every rank trains; rank 0 alone writes the folder, evaluates and saves, and hands its
    metrics to the others."""
    main = distributed.is_main()
    started = time.time()
    manifest_path = run.folder / artifacts.MANIFEST
    previous = artifacts.read_manifest(run.folder) if run.checkpoint else None
    attempts = [*(previous or {}).get("attempts", []), {"started": started, "resumed_from": run.checkpoint}]
    running = stage_manifest(run, cfg, "running", attempts=attempts)
    if main:
        prepare_folder(run, cfg)
        artifacts.write_json_atomic(manifest_path, running)
        index.register(run.key, run.folder)
    distributed.barrier()
    timings = {}
    tracker = StageTracker(cfg.logger if main else LoggerConfig(), run.name, cfg.run.output_path, run.folder, running)
    metrics: dict[str, Any] = {}
    saved = False
    try:
        with tracker:
            if STAGES[run.stage.method].make_data is not None:
                model, metrics = None, make_stage_data(run, cfg, tokenizer, guard)
            else:
                model, metrics = train_stage(run, cfg, tokenizer, guard, tracker.callbacks())
            timings[f"train:{run.name}"] = time.time() - started
            if metrics.get("stopped"):
                checkpoint = artifacts.last_checkpoint(run.folder)
                kept = f"saved {checkpoint}" if checkpoint else "had finished nothing to keep: it starts again"
                raise Preempted(f"{guard.signal_name}: stage {run.name} {kept}")
            if not main:
                del model
                metrics, replies = guard.handed_over()  # rank 0's, or Preempted when it was stopped
                return metrics, replies, timings
            if model is not None and (dtype := saved_dtype(run.stage, cfg)) is not None:
                model.to(dtype)  # evaluated as saved
            t = time.time()
            if model is not None:
                log(f"stage {run.name}: saving {run.folder}")
                with guard.interruptible(f"stage {run.name}: saving", alone=True):
                    save_model(run, model, tokenizer)
            shutil.rmtree(run.folder / "checkpoints", ignore_errors=True)  # the final model supersedes them
            attempts[-1]["finished"] = time.time()
            # complete before its evaluation: a stop there keeps the training, and the re-run
            # reuses the stage and evaluates it
            artifacts.write_json_atomic(manifest_path, complete(run, cfg, attempts, metrics))
            saved = True
            timings[f"save:{run.name}"] = time.time() - t
            t = time.time()
            if STAGES[run.stage.method].model_kind == "causal_lm":  # a reward model (or data) does not generate
                log(f"stage {run.name}: evaluating")
                with guard.interruptible(f"stage {run.name}: evaluation", alone=True):
                    eval_metrics, replies = evaluate_model(model, tokenizer, eval_rows, run.stage.eval)
                metrics.update(eval_metrics)
            else:
                replies = []
            tracker.log_final(metrics, int(metrics.get("train_steps", 0)))
            timings[f"eval:{run.name}"] = time.time() - t
        del model
        gc.collect()
        eval_key = stage_cache.eval_key(run.stage, cfg, eval_rows)
        artifacts.write_json_atomic(manifest_path, complete(run, cfg, attempts, metrics, eval_key, replies))
        guard.hand_over((metrics, replies))
        return metrics, replies, timings
    except Preempted as e:
        if saved:  # stopped in its evaluation: the stage is complete, the re-run evaluates it
            guard.hand_over_stop(e)
            raise Preempted(f"{e}; stage {run.name} is saved, its evaluation is redone") from None
        checkpoint = artifacts.last_checkpoint(run.folder)
        attempts[-1]["ended"] = time.time()  # stopped here: `posttrain show` counts its time
        if main:
            interrupted = stage_manifest(run, cfg, "interrupted", attempts=attempts, checkpoint=checkpoint)
            with contextlib.suppress(OSError):
                artifacts.write_json_atomic(manifest_path, interrupted)
            guard.hand_over_stop(e)  # the other ranks wait for rank 0's metrics when it stopped alone
        if metrics.get("stopped"):  # training stopped at the checkpoint it saved
            raise
        resumes = f"resumes from {checkpoint.name}" if checkpoint else "starts again"
        raise Preempted(f"{e}; stage {run.name} {resumes}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if main and not saved:  # an error in a saved stage's evaluation comes back when the re-run evaluates it
            attempts[-1]["ended"] = time.time()
            failed = stage_manifest(run, cfg, "failed", attempts=attempts, error=f"{type(e).__name__}: {e}"[:2000])
            with contextlib.suppress(OSError):
                artifacts.write_json_atomic(manifest_path, failed)
        raise
