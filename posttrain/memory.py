"""Memory estimates from a model's shape alone (no weights are read, nothing is downloaded):
model states per GPU for `posttrain plan=true`, and whether a stage's activations need
checkpointing (`<stage>.activation_checkpointing: auto`). Neither torch nor transformers is
imported on a machine without a GPU.

    arch = architecture(cfg.model)                   # the base model's numbers
    total, largest = parameter_counts(arch)
    on, why = activation_checkpointing(stage, cfg, spec.data_kind, source)
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import hub
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
from posttrain.models import TINY, compute_dtype

# share of a GPU's memory the estimate may fill: the CUDA context, the allocator's fragmentation
# and temporary buffers take the rest
USABLE_SHARE = 0.85
# model types whose decoder layers have four norms (before and after attention and the MLP)
FOUR_NORMS = ("gemma2", "gemma3", "gemma3_text")
# model types that normalise queries and keys per head
QK_NORM = ("qwen3", "gemma3", "gemma3_text")
# the families parameter_counts counts exactly (tests/test_memory.py builds each to compare)
FORMULA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "phi3")


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


def stage_bytes_per_parameter(stage: StageConfig, cfg: Config) -> tuple[float, str]:
    """Model-state bytes per parameter of a process that holds a stage's whole model, and what they are."""
    method = stage_peft(stage, cfg.peft)
    if method == "none":  # full fine-tuning: weights, gradients and Adam's two moments
        # auto and float16 train fp32 master weights; bfloat16 trains bf16 ones
        bf16 = cfg.model.dtype == "bfloat16"
        return (8.0, "bf16 weights, gradients, Adam") if bf16 else (16.0, "fp32 weights, gradients, Adam")
    if method == "lora":  # frozen weights in the compute dtype (on this machine); the adapters are small
        if cfg.model.dtype == "auto" and not gpu_devices_present():
            return 4.0, "float32 frozen weights"  # what compute_dtype gives on a CPU, without importing torch
        dtype = compute_dtype(cfg.model.dtype)
        return float(dtype.itemsize), f"{str(dtype).removeprefix('torch.')} frozen weights"
    return 0.6, "NF4 frozen weights"


def memory_per_gpu(
    ds: DeepSpeedConfig, total: int, largest: int, gpus: int, nodes: int, whole: float = 16.0
) -> tuple[float, float]:
    """DeepSpeed's own estimate of model-state memory (params, gradients, optimizer), in bytes:
    (per GPU, CPU per node); without ZeRO, `whole` bytes per parameter. Activations come on top."""
    if ds.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total,
            largest,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=ds.offload_optimizer,
            cpu_offload_params=ds.offload_param,
            zero_init=True,
        )
        return gpu, cpu
    if ds.stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=ds.offload_optimizer
        )
        return gpu, cpu
    return whole * total, 0.0  # no ZeRO: every process holds the whole model


def layer_activation_bytes(arch: ArchitectureConfig) -> float:
    """Bytes one decoder layer keeps per token for the backward, in 16-bit compute with sdpa/flash
    attention (no attention matrix): 26 x hidden (q, k, v, their RoPE copies, the attention output,
    both norms' fp32 inputs and 16-bit outputs) + 8 x intermediate (the MLP's four intermediates),
    as measured on Hugging Face's Llama (tests/test_memory.py)."""
    return 26.0 * arch.hidden_size + 8.0 * arch.intermediate_size


def activation_bytes(arch: ArchitectureConfig, sequences: int, length: int) -> float:
    """Activation memory of one forward and backward without checkpointing: every layer's saved
    tensors, plus the logits at their peak (16-bit, the fp32 copy the loss takes and its
    log-softmax: 10 bytes per vocabulary entry)."""
    per_token = arch.num_hidden_layers * layer_activation_bytes(arch) + 10 * arch.vocab_size
    return float(sequences * length * per_token)


def sequences_per_forward(stage: StageConfig, data_kind: str) -> int:
    """Rows in one micro-batch's forward pass of a method that trains on `data_kind` rows (StageSpec):
    pairs run chosen and rejected together, KTO its KL batch."""
    return stage.per_device_train_batch_size * (1 if data_kind in ("sft", "prompt") else 2)


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
        arch = architecture(cfg.model, source, local_only)
        total, largest = model_parameter_counts(cfg.model, source, local_only)
    except OSError as e:  # no shape to estimate from: as without auto
        return False, f"no estimate ({str(e).strip().splitlines()[0][:200]})"
    whole, _ = stage_bytes_per_parameter(stage, cfg)
    per_node, nodes = processes_per_node(cfg.launcher), cfg.launcher.nnodes
    states, _ = memory_per_gpu(cfg.deepspeed, total, largest, per_node, nodes, whole)
    length = stage.max_length or arch.max_position_embeddings
    need = states + activation_bytes(arch, sequences_per_forward(stage, data_kind), length)
    on = need > USABLE_SHARE * capacity
    return on, f"model states and activations ~{gib(need)} {'>' if on else '<='} {USABLE_SHARE:.0%} of {gib(capacity)}"


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
