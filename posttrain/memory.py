"""Memory estimates from a model's shape alone (no weights are read, nothing is downloaded):
model states per GPU for `posttrain plan=true`, and whether a stage's activations need
checkpointing (`<stage>.activation_checkpointing: auto`). Neither torch nor transformers is
imported on a machine without a GPU.

    arch = architecture(cfg.model)                   # the base model's numbers
    total, largest = parameter_counts(arch)
    hold = stage_holding(stage, cfg, arch, total, on_gpu=True)   # what a stage trains, in which dtype
    per_gpu, cpu_per_node = model_states(cfg.deepspeed, hold, gpus_per_node, nodes)
    on, why = activation_checkpointing(stage, cfg, spec.data_kind, source)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain import hub, optim
from posttrain.config import (
    ArchitectureConfig,
    Config,
    DeepSpeedConfig,
    ModelConfig,
    StageConfig,
    gpu_devices_present,
    processes_per_node,
    stage_peft,
)
from posttrain.errors import ConfigError, require
from posttrain.models import TINY, compute_dtype
from posttrain.optim import BF16_OPTIMIZERS

# share of a GPU's memory the estimate may fill: the CUDA context, the allocator's fragmentation
# and temporary buffers take the rest
USABLE_SHARE = 0.85
# model types whose decoder layers have four norms (before and after attention and the MLP)
FOUR_NORMS = ("gemma2", "gemma3", "gemma3_text")
# model types that normalise queries and keys per head
QK_NORM = ("qwen3", "gemma3", "gemma3_text")
# the families parameter_counts counts exactly (tests/test_memory.py builds each to compare)
FORMULA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "phi3")


@dataclass
class Estimate:
    """Model-state bytes of a run: per GPU (or CPU worker), and in CPU memory per node."""

    total: int  # parameters
    per_gpu: float
    cpu_per_node: float
    basis: str  # what the figures count, for the plan's line


def architecture(model: ModelConfig, source: str | None = None, local_only: bool = False) -> ArchitectureConfig:
    """The shape of the model at `source` (default: the base model): the tiny model's settings, a
    local folder's config.json, the hub cache's, the hub's (unless `local_only`), else the
    registry's numbers (`model.architecture`). OSError when none is known."""
    source = source or model.path
    if source == TINY:
        return model.tiny.architecture()
    if (found := _config_json(model, source, local_only)) is not None:
        path, config = found
        try:
            return ArchitectureConfig.from_json(config)
        except ValueError as e:  # numbers the schema refuses, or a shape without them
            raise OSError(f"{path}: {e}") from None
    if source == model.path and model.architecture is not None:
        return model.architecture
    raise OSError(f"no config.json for {source}: not a local folder, not in the hub cache, no registry numbers")


def _config_json(model: ModelConfig, source: str, local_only: bool) -> tuple[Path, dict] | None:
    """(where, content) of the config.json of the model at `source`: a local folder's, the hub
    cache's, or the hub's (unless `local_only`); None when there is none to read."""
    local = Path(source).expanduser()
    revision = model.revision if source == model.path else None
    if local.is_dir():
        path = local / "config.json"
    elif hub.is_hub_id(source) and (found := hub.cached_file(source, "config.json", revision)) is not None:
        path = Path(found)
    elif hub.is_hub_id(source) and not local_only and hub.reachable()[0]:
        path = Path(hub.download(source, "config.json", revision))
    else:
        return None
    try:
        return path, json.loads(path.read_text())
    except ValueError as e:
        raise OSError(f"{path}: not JSON ({e})") from None


def model_parameter_counts(model: ModelConfig, source: str | None = None, local_only: bool = False) -> tuple[int, int]:
    """parameter_counts of the model at `source` (default: the base model); a config.json of a
    family the formula does not know (FORMULA_TYPES) is built on the meta device instead."""
    source = source or model.path
    found = None if source == TINY else _config_json(model, source, local_only)
    if found is not None and found[1].get("model_type") not in FORMULA_TYPES:
        return _built_parameter_counts(found[1])
    return parameter_counts(architecture(model, source, local_only))


def _built_parameter_counts(config: dict) -> tuple[int, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        built_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(built_config)
    except (ValueError, KeyError, TypeError) as e:  # a model type transformers does not know
        raise OSError(f"model_type {config.get('model_type')!r}: {e}") from None
    total = sum(p.numel() for p in built.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in built.modules())
    return total, largest


def parameter_counts(arch: ArchitectureConfig) -> tuple[int, int]:
    """(total parameters, the largest module's own parameters) of a decoder-only transformer of
    this shape, as Hugging Face builds it (tests/test_memory.py compares with a built model)."""
    hidden, inter, vocab = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    head_dim = arch.head_dim or hidden // arch.num_attention_heads
    q, kv = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    # attention_bias: q, k, v and o projections; Qwen2 has q, k and v biases without saying so
    bias = q + 2 * kv + hidden if arch.attention_bias else q + 2 * kv if arch.model_type == "qwen2" else 0
    norms = (4 if arch.model_type in FOUR_NORMS else 2) * hidden + (2 * head_dim if arch.model_type in QK_NORM else 0)
    layer = 2 * hidden * q + 2 * hidden * kv + bias + 3 * hidden * inter + norms
    embeddings = vocab * hidden * (1 if arch.tie_word_embeddings else 2)
    total = embeddings + arch.num_hidden_layers * layer + hidden
    fused = arch.model_type == "phi3"  # one qkv projection, one gate+up projection
    largest = max(vocab * hidden, (2 if fused else 1) * hidden * inter, hidden * (q + 2 * kv if fused else q))
    return total, largest


# --- model states: weights, gradients and Adam per process ----------------------------------

# what DeepSpeed's ZeRO optimizer keeps per trained parameter, partitioned over the processes, in
# any precision: an fp32 copy of the weights (a clone even of fp32 ones), Adam's two fp32 moments
# and fp32 gradients (DeepSpeed's own estimate counts the same 16 on top of the 16-bit weights and
# gradients; bench/memory.py measured 13.4 bytes per parameter besides activations under fp32
# ZeRO-2 on 2 workers: 4 + (4 + 16) / 2 = 14 estimated, DeepSpeed's 2 + 18 / 2 = 11)
ZERO_OPTIMIZER = 16.0
# DeepSpeed's stage3_max_live_parameters and stage3_max_reuse_distance (posttrain keeps the
# defaults): a ZeRO-3 rank keeps gathered every parameter it uses again within 1e9 elements, so
# a model under 1e9 parameters stays whole on every rank through forward and backward, not one
# layer at a time as DeepSpeed's estimate assumes (bench/memory.py: 14.8 bytes per fp32 parameter
# on 2 workers; 4 + 24 / 2 = 16 estimated, DeepSpeed's one layer + 18 / 2 = 10)
ZERO3_MAX_LIVE = 10**9
# what DeepSpeed's estimate multiplies offloaded CPU memory by (its additional_buffer_factor);
# ZeRO-1/2's offload also keeps a copy of each partition's weights in CPU memory to send back
# (bench/memory.py, 2 fp32 workers, besides activations: ZeRO-2 offload 19.3 bytes per parameter,
# 4 + 1.5 (4 + 16) / 2 = 19 estimated; ZeRO-3 with both offloads 16.8, 4 + 1.5 (16 + 4) / 2 = 19)
OFFLOAD_BUFFER = 1.5


@dataclass
class Holding:
    """What one stage's training holds, per parameter, before ZeRO partitions anything."""

    trained: int  # parameters with gradients and Adam moments: the model's, or the LoRA adapters'
    frozen: int  # parameters without: a LoRA base
    weight_bytes: float  # per trained parameter as the model holds it; its gradient the same
    frozen_bytes: float  # per frozen parameter
    what: str
    # per trained parameter, the optimizer's states without ZeRO; None: torch AdamW's two moments
    # in the weights' dtype (2 x weight_bytes)
    state_bytes: float | None = None


def precision(dtype: str, on_gpu: bool) -> tuple[int, str]:
    """(bytes, name) of the dtype a stage computes in (models.compute_dtype): `auto` is bf16 on a
    GPU (this machine's GPU is asked; one elsewhere is assumed to have bf16 units), fp32 on CPU
    workers."""
    if on_gpu and gpu_devices_present():
        name = str(compute_dtype(dtype)).removeprefix("torch.")
    elif dtype == "auto":
        name = "bfloat16" if on_gpu else "float32"
    else:
        name = dtype
    return {"bfloat16": (2, "bf16"), "float16": (2, "fp16"), "float32": (4, "fp32")}[name]


def lora_parameters(arch: ArchitectureConfig | None, r: int, targets: list[str]) -> int:
    """Parameters of rank-`r` LoRA adapters (A: in x r, B: r x out) on the named projections of
    every decoder layer; names the shape does not know count nothing, as does an unknown shape."""
    if arch is None:
        return 0
    hidden, inter = arch.hidden_size, arch.intermediate_size
    head_dim = arch.head_dim or hidden // arch.num_attention_heads
    q, kv = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    sizes = {
        "q_proj": hidden + q, "k_proj": hidden + kv, "v_proj": hidden + kv, "o_proj": q + hidden,
        "gate_proj": hidden + inter, "up_proj": hidden + inter, "down_proj": inter + hidden,
        "qkv_proj": hidden + q + 2 * kv, "gate_up_proj": hidden + 2 * inter,
    }  # fmt: skip
    return arch.num_hidden_layers * r * sum(sizes.get(t, 0) for t in targets)


def stage_holding(
    stage: StageConfig, cfg: Config, arch: ArchitectureConfig | None, total: int, on_gpu: bool
) -> Holding:
    """What a stage trains and holds: a full fine-tune's weights in the dtype it trains them in
    (under DeepSpeed the compute dtype: its fp32 copy is in ZERO_OPTIMIZER; without, fp32 master
    weights for `auto` and `float16`, bf16 for `bfloat16`), or a LoRA stage's frozen base in the
    compute dtype (NF4 for QLoRA) and its adapters (fp32 as PEFT makes them; the compute dtype
    under DeepSpeed, which casts the whole model)."""
    size, name = precision(cfg.model.dtype, on_gpu)
    deepspeed = cfg.deepspeed.stage is not None
    method = stage_peft(stage, cfg.peft)
    if method == "none":
        if deepspeed:
            return Holding(total, 0, size, 0.0, f"{name} weights and gradients, DeepSpeed's fp32 copy and Adam")
        if stage.optimizer in BF16_OPTIMIZERS:  # bf16 whatever the device: the optimizer's own
            states = optim.state_bytes(stage.optimizer)
            return Holding(total, 0, 2, 0.0, f"bf16 weights, gradients, {stage.optimizer} ({states} B)", states)
        if cfg.model.dtype == "bfloat16":
            return Holding(total, 0, 2, 0.0, "bf16 weights, gradients, Adam")
        return Holding(total, 0, 4, 0.0, "fp32 weights, gradients, Adam")
    adapters = lora_parameters(arch, cfg.peft.r, cfg.peft.target_modules or cfg.model.lora_target_modules)
    frozen, frozen_name = (size, f"{name} frozen weights") if method == "lora" else (0.6, "NF4 frozen weights")
    return Holding(adapters, total, size if deepspeed else 4, frozen, f"{frozen_name}, LoRA adapters and Adam")


def model_states(ds: DeepSpeedConfig, hold: Holding, gpus: int, nodes: int) -> tuple[float, float]:
    """Model-state bytes (weights, gradients, Adam) of each process, and in CPU memory per node
    (offloaded states), for `gpus` processes on each of `nodes` nodes. Activations come on top.

    N trained parameters of b bytes, F frozen ones of f bytes, w processes (bench/memory.py
    measures each on 2 fp32 CPU workers):
      no ZeRO  f F + (2 b + s + b when w > 1) N: weights, gradients, the optimizer's states s
               (torch's AdamW: its moments in the weights' dtype, s = 2 b; a BF16 optimizer's from
               posttrain/optim.py); DDP's buckets copy the gradients (measured: 20 bytes per fp32
               parameter, not 16)
      ZeRO-1/2 f F + b N + (b + 16) N / w: the weights whole, gradients and DeepSpeed's fp32 copy
               and Adam partitioned (ZeRO-1 measured within 6% of ZeRO-2 in DeepSpeed 0.19: its
               gradients are reduced into partitions too)
      ZeRO-3   (f F + (2 b + 16) N) / w + the gathered weights, whole up to ZERO3_MAX_LIVE
               parameters (measured: 4 + 24 / 2 bytes per fp32 parameter, not 24 / 2)
    Optimizer offload moves the partitioned gradients, fp32 copy and Adam (ZeRO-1/2: and a copy
    of the weights' partition) to CPU memory, parameter offload each rank's weights, all times
    OFFLOAD_BUFFER. The
    frozen base of LoRA is replicated like weights under ZeRO-1/2 and partitioned under ZeRO-3.
    DeepSpeed's own estimate assumes 16-bit weights (b = 2) and one gathered layer under ZeRO-3;
    with b = 2 the ZeRO-1/2 formula is its own."""
    n, f, b, frozen = hold.trained, hold.frozen_bytes, hold.weight_bytes, hold.frozen
    world = gpus * nodes
    if ds.stage is None:
        states = 2 * b if hold.state_bytes is None else hold.state_bytes
        return f * frozen + (2 * b + states + (b if world > 1 else 0)) * n, 0.0
    gradients, optimizer, cpu = b * n / world, ZERO_OPTIMIZER * n / world, 0.0  # partitioned
    if ds.offload_optimizer:  # gradients reduced into CPU memory: ZERO_OPTIMIZER's fp32 ones
        cpu, gradients, optimizer = gpus * OFFLOAD_BUFFER * optimizer, 0.0, 0.0
    if ds.stage in (1, 2):
        copy = gpus * OFFLOAD_BUFFER * b * n / world if ds.offload_optimizer else 0.0  # the weights' partition
        return f * frozen + b * n + gradients + optimizer, cpu + copy
    gathered = f * min(frozen, ZERO3_MAX_LIVE) + b * min(n, ZERO3_MAX_LIVE)
    weights = (f * frozen + b * n) / world  # each rank's partition
    if ds.offload_param:
        cpu, weights = cpu + gpus * OFFLOAD_BUFFER * weights, 0.0
    return gathered + weights + gradients + optimizer, cpu


def layer_activation_bytes(arch: ArchitectureConfig) -> float:
    """Bytes one decoder layer keeps per token for the backward, in 16-bit compute with sdpa/flash
    attention (no attention matrix): 26 x hidden (q, k, v, their RoPE copies, the attention output,
    both norms' fp32 inputs and 16-bit outputs) + 8 x intermediate (the MLP's four intermediates),
    as measured on Hugging Face's Llama (tests/test_memory.py)."""
    return 26.0 * arch.hidden_size + 8.0 * arch.intermediate_size


def activation_bytes(arch: ArchitectureConfig, sequences: int, length: int, checkpointing: bool = False) -> float:
    """Activation memory of one forward and backward: every layer's saved tensors (with
    activation checkpointing only each layer's 16-bit input, plus the one layer being recomputed),
    plus the logits at their peak (16-bit, the fp32 copy the loss takes and its log-softmax: 10
    bytes per vocabulary entry)."""
    layers = arch.num_hidden_layers * layer_activation_bytes(arch)
    if checkpointing:
        layers = arch.num_hidden_layers * 2.0 * arch.hidden_size + layer_activation_bytes(arch)
    return float(sequences * length * (layers + 10 * arch.vocab_size))


def sequences_per_forward(micro_batch: int, data_kind: str) -> int:
    """Rows in one micro-batch's forward pass of a method that trains on `data_kind` rows (StageSpec):
    pairs run chosen and rejected together, KTO its KL batch."""
    return micro_batch * (1 if data_kind in ("sft", "prompt") else 2)


def stage_model_states(
    stage: StageConfig, cfg: Config, source: str | None = None, local_only: bool = False, on_gpu: bool = True
) -> tuple[ArchitectureConfig, float, int]:
    """The model's shape, the stage's model states per process in bytes, and the length its
    activations are estimated at (max_length, else the model's limit). OSError: no shape known."""
    arch = architecture(cfg.model, source, local_only)
    total, _ = model_parameter_counts(cfg.model, source, local_only)
    hold = stage_holding(stage, cfg, arch, total, on_gpu)
    states, _ = model_states(cfg.deepspeed, hold, processes_per_node(cfg.launcher), cfg.launcher.nnodes)
    return arch, states, stage.max_length or arch.max_position_embeddings


def activation_checkpointing(
    stage: StageConfig, cfg: Config, data_kind: str, source: str | None = None, local_only: bool = False
) -> tuple[bool, str]:
    """A stage's `activation_checkpointing`, with `auto` decided for the model at `source`
    (default: the base model): on when the GPU cannot hold the model states and one micro-batch's
    activations at max_length; off on a CPU. `data_kind`: the method's (StageSpec.data_kind).
    Returns (on, why)."""
    if stage.activation_checkpointing != "auto":
        return bool(stage.activation_checkpointing), "set in the config"
    capacity = gpu_memory()
    if capacity is None:
        return False, "no GPU"
    try:
        arch, states, length = stage_model_states(stage, cfg, source, local_only)
    except OSError as e:  # no shape to estimate from: as without auto
        return False, f"no estimate ({str(e).strip().splitlines()[0][:200]})"
    need = states + activation_bytes(arch, sequences_per_forward(stage.per_device_train_batch_size, data_kind), length)
    on = need > USABLE_SHARE * capacity
    return on, f"model states and activations ~{gib(need)} {'>' if on else '<='} {USABLE_SHARE:.0%} of {gib(capacity)}"


def auto_micro_batch(
    name: str, stage: StageConfig, cfg: Config, data_kind: str, capacity: float, world: int, on_gpu: bool = True
) -> tuple[int, str]:
    """`per_device_train_batch_size: auto`: the largest micro-batch that divides the rows each
    process takes per step (global_batch_size / world, which stays as it is: gradient accumulation
    makes up the rest) and whose model states and activations at max_length fit USABLE_SHARE of
    `capacity` bytes. Without activation checkpointing when some micro-batch fits so; with it
    (when the stage's activation_checkpointing is auto or true) otherwise. Returns (micro-batch, why)."""
    key = f"{name}.per_device_train_batch_size"
    require(
        stage.global_batch_size % world == 0,
        key,
        f"auto: global_batch_size {stage.global_batch_size} does not divide over {world} processes",
    )
    try:
        arch, states, length = stage_model_states(stage, cfg, local_only=True, on_gpu=on_gpu)
    except OSError as e:
        raise ConfigError(
            f"{key}: auto needs the model's shape ({str(e).strip().splitlines()[0][:200]}); give a number"
        ) from None
    per_rank = stage.global_batch_size // world
    budget = USABLE_SHARE * capacity
    # auto: off on CPU workers (activation_checkpointing's rule), tried second on a GPU
    modes = [bool(stage.activation_checkpointing)]
    if stage.activation_checkpointing == "auto":
        modes = [False, True] if on_gpu else [False]
    for checkpointing in modes:
        for micro in (b for b in range(per_rank, 0, -1) if per_rank % b == 0):
            need = states + activation_bytes(arch, sequences_per_forward(micro, data_kind), length, checkpointing)
            if need <= budget:
                how = "with activation checkpointing" if checkpointing else "without activation checkpointing"
                return micro, (
                    f"{micro} x {length} tokens {how}: model states and activations ~{gib(need)} <= "
                    f"{USABLE_SHARE:.0%} of {gib(capacity)}; x {per_rank // micro} accumulation x {world} processes "
                    f"keeps {stage.global_batch_size}"
                )
    raise ConfigError(
        f"{key}: auto: not even 1 sequence of {length} tokens fits {USABLE_SHARE:.0%} of {gib(capacity)} "
        f"(model states alone ~{gib(states)}); lower max_length, or use peft=lora, deepspeed=zero3 "
        "or optimizer=adamw_sr_bf16"
    )


def device_memory(processes: int = 1) -> tuple[float, bool]:
    """(bytes, on a GPU) each process may fill: this machine's first GPU, else its RAM shared by
    `processes` CPU workers."""
    if (capacity := gpu_memory()) is not None:
        return capacity, True
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / processes, False


def gpu_memory() -> float | None:
    """This machine's first GPU's memory in bytes, or None without one."""
    if not gpu_devices_present():
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
