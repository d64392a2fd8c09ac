"""Memory estimates from a model's config.json alone (no weights are read): model states per GPU
for `posttrain plan=true`, and whether a stage's activations need checkpointing
(`<stage>.activation_checkpointing: auto`).

    config = model_config(cfg.model)                 # transformers config of the base model
    on, why = activation_checkpointing(stage, cfg, spec.data_kind, source)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.config import Config, DeepSpeedConfig, ModelConfig, StageConfig, processes_per_node, stage_peft
from posttrain.models import TINY, compute_dtype, tiny_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# share of a GPU's memory the estimate may fill: the CUDA context, the allocator's fragmentation
# and temporary buffers take the rest
USABLE_SHARE = 0.85


def model_config(model: ModelConfig, source: str | None = None, local_only: bool = False) -> PretrainedConfig:
    """The transformers config of `source` (default: the base model). `local_only`: a hub id's
    config from the local cache only (no network)."""
    from transformers import AutoConfig

    source = source or model.path
    if source == TINY:
        return tiny_config(model, model.tiny.vocab_size)
    revision = model.revision if source == model.path else None
    return AutoConfig.from_pretrained(source, revision=revision, local_files_only=local_only)


def parameter_counts(config: PretrainedConfig) -> tuple[int, int]:
    """(total parameters, largest layer's own parameters): the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in built.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in built.modules())
    return total, largest


def stage_bytes_per_parameter(stage: StageConfig, cfg: Config) -> tuple[float, str]:
    """Model-state bytes per parameter of a process that holds a stage's whole model, and what they are."""
    method = stage_peft(stage, cfg.peft)
    if method == "none":  # full fine-tuning: weights, gradients and Adam's two moments
        # auto and float16 train fp32 master weights; bfloat16 trains bf16 ones
        bf16 = cfg.model.dtype == "bfloat16"
        return (8.0, "bf16 weights, gradients, Adam") if bf16 else (16.0, "fp32 weights, gradients, Adam")
    if method == "lora":  # frozen weights in the compute dtype (on this machine); the adapters are small
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


def layer_activation_bytes(config: PretrainedConfig) -> float:
    """Bytes one decoder layer keeps per token for the backward, in 16-bit compute with sdpa/flash
    attention (no attention matrix): 26 x hidden (q, k, v, their RoPE copies, the attention output,
    both norms' fp32 inputs and 16-bit outputs) + 8 x intermediate (the MLP's four intermediates),
    as measured on Hugging Face's Llama (tests/test_memory.py)."""
    text = config.get_text_config()
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    return 26.0 * text.hidden_size + 8.0 * intermediate


def activation_bytes(config: PretrainedConfig, sequences: int, length: int) -> float:
    """Activation memory of one forward and backward without checkpointing: every layer's saved
    tensors, plus the logits at their peak (16-bit, the fp32 copy the loss takes and its
    log-softmax: 10 bytes per vocabulary entry)."""
    text = config.get_text_config()
    per_token = text.num_hidden_layers * layer_activation_bytes(config) + 10 * text.vocab_size
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
        config = model_config(cfg.model, source, local_only)
    except (OSError, ValueError) as e:  # no config.json to estimate from: as without auto
        return False, f"no estimate ({str(e).strip().splitlines()[0][:200]})"
    total, largest = parameter_counts(config)
    whole, _ = stage_bytes_per_parameter(stage, cfg)
    per_node, nodes = processes_per_node(cfg.launcher), cfg.launcher.nnodes
    states, _ = memory_per_gpu(cfg.deepspeed, total, largest, per_node, nodes, whole)
    length = stage.max_length or config.get_text_config().max_position_embeddings
    need = states + activation_bytes(config, sequences_per_forward(stage, data_kind), length)
    on = need > USABLE_SHARE * capacity
    return on, f"model states and activations ~{gib(need)} {'>' if on else '<='} {USABLE_SHARE:.0%} of {gib(capacity)}"


def gpu_memory() -> float | None:
    """This machine's first GPU's memory in bytes, or None without one."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
