"""The stage contract and the training step every method shares.

A method is one file in this folder that defines its config dataclass (fields beyond
`StageConfig`) and a `make_trainer` function, bundled in a `StageSpec`, plus one line in
`posttrain/stages/__init__.py`. TRL's imports stay inside `make_trainer`, so a TRL move
touches one file and `posttrain --help` never imports TRL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posttrain.config import ConfigError, StageConfig, global_batch, require
from posttrain.fused_head import cpu_lm_head
from posttrain.memory import activation_checkpointing
from posttrain.models import compute_dtype
from posttrain.rewards import reward_specs

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from posttrain.config import Config
    from posttrain.preemption import PreemptionGuard
    from posttrain.ref_logps import RefLogpsCache
    from posttrain.rewards import Reward


@dataclass
class OnlineStageConfig(StageConfig):
    """What every stage that samples replies from its model and scores them has (the defaults
    of conf/shared/online.yaml)."""

    # who scores the replies: builtin (the built-in tasks' checker), builtin_partial (graded), an
    # earlier rm stage's name (or a folder holding a reward model), module:function(prompts,
    # completions) -> floats, or a list of these (a reply's reward: their weighted sum)
    reward: str | list[str] = "builtin"
    # one weight per reward source (null: 1.0 each)
    reward_weights: list[float] | None = None
    temperature: float = 1.0
    top_p: float = 1.0

    def validate(self, key: str) -> None:
        super().validate(key)
        sources = reward_specs(self.reward)
        require(bool(sources), f"{key}.reward", "names no source; give one (builtin) or a list of them")
        if self.reward_weights is not None:
            weights = self.reward_weights
            require(
                len(weights) == len(sources),
                f"{key}.reward_weights",
                f"{len(weights)} weights for {len(sources)} reward sources ({', '.join(sources)}); give one each",
            )
            for weight in weights:
                require(weight >= 0, f"{key}.reward_weights", f"{weight:g} is negative; weights must be >= 0")
            require(any(w > 0 for w in weights), f"{key}.reward_weights", "all are 0; at least one must be > 0")
        require(self.temperature > 0, f"{key}.temperature", f"{self.temperature} must be > 0 (replies must differ)")
        require(0 < self.top_p <= 1, f"{key}.top_p", f"{self.top_p} is not in (0, 1]")


def last_turn_text(value: str | list[dict]) -> str:
    """A prompt or reply as reward sources take it: the text itself, or a conversation's last turn."""
    return value if isinstance(value, str) else value[-1]["content"]


@dataclass
class TrainerInputs:
    """What a method's `make_trainer` gets."""

    cfg: StageConfig
    model: PreTrainedModel
    ref_model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    train_dataset: Dataset
    eval_dataset: Dataset | None
    # transformers.TrainingArguments fields shared by every method (precision, batch, schedule...)
    args: dict[str, Any]
    peft_config: Any
    callbacks: list = field(default_factory=list)
    # where precomputed reference log-probs are kept (methods with a reference model)
    ref_logps: RefLogpsCache | None = None
    # the stage's reward source (online methods)
    reward: Reward | None = None
    # the run's preemption guard: a method's long phases inside a training step (GRPO's
    # generation) stop at once on a signal (posttrain/preemption.py)
    guard: PreemptionGuard | None = None

    def trainer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every TRL trainer takes, besides its config."""
        # every trainer is built through here: TRL's fused LM head then projects only labelled
        # positions on a CPU too, and keeps small logits for the backward (posttrain/fused_head.py)
        cpu_lm_head()
        return dict(
            model=self.model,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=self.tokenizer,
            peft_config=self.peft_config,
            callbacks=self.callbacks,
        )


@dataclass
class DataStageInputs:
    """What a data stage's `make_data` gets."""

    # the data stage's own config (a PairsStageConfig, ...)
    cfg: StageConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train_prompts: Dataset
    eval_prompts: Dataset | None
    reward: Reward
    folder: Path
    # the model's folder (vLLM reads it)
    source: str
    seed: int
    # the checkpoint a resumed stage continues from
    checkpoint: Path | None
    # the run's preemption guard (posttrain/preemption.py): the sampling is interruptible
    guard: PreemptionGuard


def batch_rows_for_steps(stage: StageConfig, world: int) -> int | None:
    """The train rows `stage.max_steps` optimizer steps read on `world` processes when every
    sequence of a batch is one row: max_steps x the global batch."""
    return stage.max_steps * global_batch(stage, world)


@dataclass(frozen=True)
class StageSpec:
    """A method as the pipeline sees it."""

    config_cls: type
    # which rows the method trains on: conversations, preference pairs, single replies
    # labelled good/bad (a preference source is split into two such rows per pair), or
    # prompts alone (online stages generate the replies)
    data_kind: Literal["sft", "preference", "unpaired", "prompt"]
    # True: the policy is compared with a frozen reference model (by default the stage's parent)
    uses_reference: bool
    # None for a data stage (make_data)
    make_trainer: Callable[[TrainerInputs], Trainer] | None
    # TRL's config class for the method, imported on call (its fields bound `trainer_args`)
    trl_config: Callable[[], type] | None
    # trainer.evaluate() keys shown in the summary, as (key, column name)
    summary_metrics: tuple[tuple[str, str], ...] = ()
    # what the stage trains and saves: a causal LM (generates), a reward model (a scalar head),
    # or none: a data stage, which writes a dataset and passes its parent's model on
    model_kind: Literal["causal_lm", "reward", "none"] = "causal_lm"
    # a data stage's work (posttrain/stages/pairs.py): returns its metrics, None when stopped
    make_data: Callable[[DataStageInputs], dict[str, float] | None] | None = None
    # True: the stage scores replies with a reward source (its `reward` field)
    uses_reward: bool = False
    # True: the method can train on padding-free batches (the stage's `padding_free`)
    padding_free: bool = False
    # (stage, processes) -> the train rows its max_steps optimizer steps read, all a stage with
    # max_steps keeps (posttrain.stages.max_steps_rows); None: not known before the trainer
    # prepares the rows
    rows_for_steps: Callable[[StageConfig, int], int | None] = batch_rows_for_steps


# --- shared training arguments ---------------------------------------------------------


def training_args(
    spec: StageSpec, cfg: StageConfig, run_cfg: Config, stage_dir: Path, source: str | None = None
) -> dict[str, Any]:
    """transformers/TRL training arguments from a stage config of method `spec`, with precision and
    activation checkpointing set from the device (for the model at `source`, default the base model)."""
    import torch

    dtype = compute_dtype(run_cfg.model.dtype)
    args: dict[str, Any] = dict(
        output_dir=str(stage_dir / "checkpoints"),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        seed=run_cfg.run.seed,
        data_seed=run_cfg.run.seed,
        # TRL defaults to bf16 and activation checkpointing: wrong for CPU and for small models.
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=activation_checkpointing(cfg, run_cfg, spec.data_kind, source)[0],
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        # resumable checkpoints (model, optimizer, scheduler, RNG, data position); the newest only
        save_strategy="steps" if cfg.checkpoint_steps > 0 else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=1,
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    if cfg.group_by_length:
        args["train_sampling_strategy"] = "group_by_length"
    if cfg.compile:
        args["torch_compile"] = True
    if cfg.liger:
        args["use_liger_kernel"] = True
    args.update(cfg.trainer_args)
    return args


# rows below which one process tokenizes faster than a pool of them starts
PARALLEL_TOKENIZATION_ROWS = 4000


def tokenization_processes(spec: StageSpec, cfg: StageConfig, rows: int) -> dict[str, int]:
    """TRL's `dataset_num_proc` for a stage of `rows` training rows: the CPU cores this rank may
    use (at most 8), when the method's trainer tokenizes in processes and the dataset is large
    enough to pay for starting them ({} otherwise, and when trainer_args sets it)."""
    import dataclasses
    import os

    if spec.trl_config is None or "dataset_num_proc" in cfg.trainer_args or rows < PARALLEL_TOKENIZATION_ROWS:
        return {}
    if "dataset_num_proc" not in {f.name for f in dataclasses.fields(spec.trl_config())}:
        return {}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = usable // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return {"dataset_num_proc": min(cores, 8)} if cores > 1 else {}


def check_trainer_args(spec: StageSpec, cfg: StageConfig, key: str) -> None:
    """Raise ConfigError for a `trainer_args` key that TRL's config class for the method lacks."""
    import dataclasses

    if not cfg.trainer_args:
        return
    if spec.trl_config is None:
        raise ConfigError(f"{key}.trainer_args: {cfg.method} trains nothing and takes no trainer arguments")
    config_cls = spec.trl_config()
    known = {f.name for f in dataclasses.fields(config_cls)}
    for name in cfg.trainer_args:
        if name not in known:
            raise ConfigError(f"{key}.trainer_args.{name}: not a field of TRL's {config_cls.__name__}")


# --- metrics ----------------------------------------------------------------------------


def metrics_logger(path: Path) -> Any:
    """A TrainerCallback appending every log record (loss, lr, rewards...) to `path` as JSON lines."""
    from transformers import TrainerCallback

    class MetricsLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                with path.open("a") as f:
                    f.write(json.dumps(record) + "\n")

    return MetricsLogger()


# training-log keys shown beside a stage's progress bar
PROGRESS_KEYS = {
    "loss": "loss",
    "rewards/margins": "margin",
    "rewards/accuracies": "reward_acc",
    "reward": "reward",  # an online stage's sampled reward, and the share of its groups with no signal
    "frac_reward_zero_std": "equal_groups",
    "learning_rate": "lr",
}


def use_stage_progress_bar(trainer: Trainer, stage: str) -> None:
    """Replace transformers' progress bar (which prints every log dict) with one per stage that
    shows step, ETA and the latest loss (and reward margin/accuracy) beside the bar."""
    from transformers.trainer_callback import ProgressCallback

    class StageProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(stage)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {name: f"{logs[key]:.3g}" for key, name in PROGRESS_KEYS.items() if key in logs}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StageProgress())
