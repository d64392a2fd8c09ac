"""The fields every stage shares (conf/shared/stage.yaml, which each sft/align/pairs option pulls
in), its evaluation and gate, and the batch arithmetic. A method's own fields live in its stage
file (posttrain/stages/<method>.py), a subclass of `StageConfig`.

    posttrain align.learning_rate=1e-6 align.max_steps=100 align.gate.min_reward_accuracy=0.7
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.config.data import DataSource
from posttrain.config.model import PEFT_METHODS, PeftConfig
from posttrain.errors import require
from posttrain.optim import OPTIMIZERS


@dataclass
class EvalConfig:
    # exact-match accuracy of greedy replies on held-out prompts (the built-in task)
    exact_match: bool = False
    num_prompts: int = 200
    max_new_tokens: int = 64
    batch_size: int = 32
    # held-out rows for the response loss and the trainer's own held-out metrics (eval loss, reward accuracy)
    num_loss_rows: int = 200
    # completions written side by side into summary.json
    num_samples: int = 4
    # who compares this stage's replies with its parent's (win_rate_vs_parent): null, exact_match
    # (a correct reply beats a wrong one), or a function `module:function(prompts, replies, parent_replies)`
    # returning one score per prompt in [0, 1] (1: this stage's reply wins, 0.5: a tie)
    judge: str | None = None

    def __post_init__(self) -> None:
        if self.judge not in (None, "exact_match"):
            module, _, function = self.judge.partition(":")
            require(bool(module and function), "eval.judge", f"{self.judge!r} is not exact_match or module:function")


# gate field -> the stage metric it bounds
GATE_METRICS = {
    "min_exact_match": "exact_match",
    "min_win_rate": "win_rate_vs_parent",
    "min_reward_accuracy": "eval_rewards/accuracies",
    "min_reward_margin": "eval_rewards/margins",
    "max_response_loss": "response_loss",
}


@dataclass
class GateConfig:
    """Bounds a stage's metrics must meet for the chain to go on (null: no bound)."""

    min_exact_match: float | None = None
    min_win_rate: float | None = None
    min_reward_accuracy: float | None = None
    min_reward_margin: float | None = None
    max_response_loss: float | None = None

    def bounds(self) -> dict[str, float]:
        return {name: value for name in GATE_METRICS if (value := getattr(self, name)) is not None}


@dataclass
class StageConfig:
    """Fields every stage has; a method's own fields live in its stage file. The defaults here are
    conf/shared/stage.yaml's, which every sft/align/pairs option pulls in (tests/test_config.py
    compares them); a method's subclass redefines what its own option changes."""

    # the method from the stage registry (posttrain/stages/): sft, dpo, orpo, kto, cpo, simpo, rm,
    # pairs, grpo, a plugin's, or none (the stage does not run)
    method: str = "none"
    # where the model starts: base, previous (the stage before it in run.stages), or an earlier stage
    init_from: str = "previous"
    # the frozen model a method with a reference compares the policy with: null (the stage it
    # starts from), base, or an earlier stage; reference-free methods take none
    reference: str | None = None
    # PEFT for this stage: null (the peft group's method), none (full fine-tuning), lora, qlora
    peft: str | None = None
    # the rows it trains on: a data source (each method's option points it at data.sft or
    # data.preference; a source of its own: {path: /data/pairs.jsonl})
    data: DataSource = field(default_factory=DataSource)
    learning_rate: float = 1e-5
    num_train_epochs: float = 1.0
    # optimizer steps (-1: num_train_epochs); the stage keeps only the train rows they read
    # (posttrain.stages.max_steps_rows)
    max_steps: int = -1
    # sequences per device per step, or auto: the largest that fits the device's memory by the
    # memory plan (needs global_batch_size, which it keeps; resolved when the config loads)
    per_device_train_batch_size: int | str = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # examples per optimizer step over all processes; when set, gradient_accumulation_steps is
    # derived from it (global / (per_device_train_batch_size x processes)), so a recipe keeps its
    # batch on any number of GPUs
    global_batch_size: int | None = None
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int | None = 2048
    logging_steps: int = 10
    group_by_length: bool = False
    # recompute activations in the backward pass: true, false, or auto (on when a GPU's memory
    # cannot hold the model states and activations, estimated from the model's config)
    activation_checkpointing: bool | str = "auto"
    # save a resumable checkpoint every N optimizer steps (0: only when preempted)
    checkpoint_steps: int = 500
    # a micro-batch's rows concatenated into one row with per-row position ids: no padding is
    # computed (methods with a padding-free path: StageSpec.padding_free)
    padding_free: bool = False
    # adamw (the trainer's AdamW on the weights model.dtype gives), adamw_kahan_bf16 or
    # adamw_sr_bf16 (bf16 weights and Adam states, updates Kahan-compensated or stochastically
    # rounded: posttrain/optim.py)
    optimizer: str = "adamw"
    # torch.compile the model (transformers' torch_compile)
    compile: bool = False
    # Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU; CUDA and liger-kernel)
    liger: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        require(self.learning_rate > 0, f"{key}.learning_rate", f"{self.learning_rate} must be > 0")
        require(self.num_train_epochs > 0, f"{key}.num_train_epochs", f"{self.num_train_epochs} must be > 0")
        require(self.max_steps == -1 or self.max_steps > 0, f"{key}.max_steps", "must be -1 (use epochs) or > 0")
        micro = self.per_device_train_batch_size
        if isinstance(micro, str):
            require(micro == "auto", f"{key}.per_device_train_batch_size", f"{micro!r} is not a number or auto")
            require(
                self.global_batch_size is not None,
                f"{key}.per_device_train_batch_size",
                f"auto needs {key}.global_batch_size (the batch it keeps while it picks the micro-batch)",
            )
        else:
            require(micro > 0, f"{key}.per_device_train_batch_size", f"{micro} must be > 0 or auto")
        for name in ("per_device_eval_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, name) > 0, f"{key}.{name}", f"{getattr(self, name)} must be > 0")
        require(
            self.global_batch_size is None or self.global_batch_size > 0,
            f"{key}.global_batch_size",
            f"{self.global_batch_size} must be > 0 or null",
        )
        require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0 (steps, or a ratio below 1)")
        require(self.max_length is None or self.max_length > 0, f"{key}.max_length", "must be > 0 or null")
        require(self.checkpoint_steps >= 0, f"{key}.checkpoint_steps", f"{self.checkpoint_steps} must be >= 0")
        require(
            self.activation_checkpointing in (True, False, "auto"),
            f"{key}.activation_checkpointing",
            f"{self.activation_checkpointing!r} is not one of true, false, auto",
        )
        methods = ", ".join(PEFT_METHODS)
        require(self.peft in (None, *PEFT_METHODS), f"{key}.peft", f"{self.peft!r} is not one of null, {methods}")
        allowed = ", ".join(OPTIMIZERS)
        require(self.optimizer in OPTIMIZERS, f"{key}.optimizer", f"{self.optimizer!r} is not one of {allowed}")
        if self.gate.min_exact_match is not None:
            require(self.eval.exact_match, f"{key}.gate.min_exact_match", f"needs {key}.eval.exact_match=true")
        if self.gate.min_win_rate is not None:
            require(bool(self.eval.judge), f"{key}.gate.min_win_rate", f"needs a judge: {key}.eval.judge")
        self.data.validate(f"{key}.data")


# --- batches ----------------------------------------------------------------------------


def resolve_batches(stages: dict[str, StageConfig], world: int) -> None:
    """Derive gradient_accumulation_steps of every stage that sets global_batch_size."""
    for name, stage in stages.items():
        if stage.global_batch_size is None:
            continue
        per_step = stage.per_device_train_batch_size * world
        require(
            stage.global_batch_size % per_step == 0,
            f"{name}.global_batch_size",
            f"{stage.global_batch_size} is not divisible by per_device_train_batch_size "
            f"{stage.per_device_train_batch_size} x {world} processes = {per_step}; choose a multiple of {per_step} "
            f"or change {name}.per_device_train_batch_size",
        )
        stage.gradient_accumulation_steps = stage.global_batch_size // per_step


def global_batch(stage: StageConfig, world: int) -> int:
    return stage.per_device_train_batch_size * stage.gradient_accumulation_steps * world


def stage_peft(stage: StageConfig, peft: PeftConfig) -> str:
    """A stage's PEFT method: its own `peft`, else the peft group's."""
    return stage.peft or peft.method
