"""Model registry: build or find a base model, then load model + tokenizer + chat template.

`model.path: builtin:tiny` builds a small Llama-architecture model and a byte-level BPE
tokenizer on the spot (no download), saves both to the cache folder, and from then on
loads them with `from_pretrained`, the same path a user's hub id or local folder takes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain import chat_templates, checkpoints
from posttrain.config import ConfigError
from posttrain.data.builtin import TaskSpec, generated_key, sample_text

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from posttrain.config import ModelConfig

TINY = "builtin:tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --- the built-in tiny model ----------------------------------------------------------


def train_tokenizer(
    vocab_size: int,
    special_tokens: list[str] = SPECIAL_TOKENS,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    bos: str | None = None,
    chat_template: str = chat_templates.CHATML,
):
    """A byte-level BPE tokenizer trained on the built-in tasks' text, with a family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one, so numbers are spelled in a way a tiny model can add.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_text(TaskSpec()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos, chat_template=chat_template
    )


def tiny_config(cfg: ModelConfig, vocab_size: int, pad_token_id: int | None = None, eos_token_id: int | None = None):
    """The tiny Llama's `LlamaConfig` (vocab_size: its tokenizer's length)."""
    from transformers import LlamaConfig

    shape = dataclasses.asdict(cfg.tiny.architecture(vocab_size))
    for name in ("model_type", "head_dim"):  # LlamaConfig's own, derived from the rest
        shape.pop(name)
    return LlamaConfig(
        **shape,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def build_tiny(cfg: ModelConfig, folder: Path) -> None:
    """Build the tiny Llama and its tokenizer into `folder` (atomically, via a temporary sibling)."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(cfg.tiny.vocab_size)
    torch.manual_seed(cfg.tiny.seed)
    config = tiny_config(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # built by another process meanwhile: same seed, same weights
        shutil.rmtree(tmp, ignore_errors=True)


def base_model_source(cfg: ModelConfig, cache_dir: Path) -> str:
    """What `from_pretrained` should load: a hub id, a local folder, a GGUF file's converted folder,
    or the built tiny model's folder."""
    if cfg.path != TINY:
        return checkpoints.resolve(cfg, cache_dir)
    # The tokenizer is trained on built-in task text: a new generator means a new model.
    folder = cache_dir / "models" / f"tiny-{generated_key(cfg.tiny.__dict__)}"
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        build_tiny(cfg, folder)
    return str(folder)


# --- loading ---------------------------------------------------------------------------


def _revision(source: str, cfg: ModelConfig) -> str | None:
    """The configured hub revision applies to the base model only, not to a stage's artifact."""
    return cfg.revision if source == cfg.path else None


def compute_dtype(name: str) -> torch.dtype:
    """The dtype the matmuls run in; `auto`: bf16 on a GPU that has bf16 units, fp32 elsewhere
    (bf16 autocast on CPU is ~4x slower)."""
    import torch

    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def weights_dtype(name: str, trained: bool) -> torch.dtype:
    """The dtype weights are loaded in. `auto`: weights a plain trainer updates stay fp32 (bf16
    autocast computes; an update of lr 5e-7 is below bf16's resolution and would vanish), frozen
    ones (references, evaluation, LoRA bases, DeepSpeed's bf16 copy) take the compute dtype.
    `float16` trains fp32 weights too: fp16 autocast's gradient scaler cannot unscale fp16 gradients."""
    import torch

    return torch.float32 if name in ("auto", "float16") and trained else compute_dtype(name)


def load_tokenizer(source: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=_revision(source, cfg))
    except (OSError, ValueError) as e:  # not on disk and no hub (offline), gated, or not a model folder
        reason = str(e).strip().splitlines()[0]
        raise ConfigError(f"model.path: could not load a tokenizer from {source!r} ({reason})") from None
    template = chat_templates.resolve(cfg.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    for role, token in (("eos", cfg.eos_token), ("pad", cfg.pad_token)):
        if token is None:
            continue
        if token not in tokenizer.get_vocab():
            raise ConfigError(f"model.{role}_token: {token!r} is not a token of {source!r}'s vocabulary")
        setattr(tokenizer, f"{role}_token", token)
    if tokenizer.chat_template is None:
        raise ConfigError(
            f"model.chat_template: tokenizer of {source!r} has no chat template; "
            f"set one of {', '.join(chat_templates.CHAT_TEMPLATES)} or a Jinja string"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def marks_assistant_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True if the chat template can produce an assistant-token mask (it has a generation block)."""
    return "{% generation %}" in (tokenizer.chat_template or "").replace("{%-", "{%").replace("-%}", "%}")


def load_model(
    source: str,
    cfg: ModelConfig,
    kind: str = "causal_lm",
    quantize_4bit: bool = False,
    pad_token_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """A causal LM, or (kind `reward`) the same weights under a scalar sequence-classification head
    (a new head when `source` is a causal LM); `quantize_4bit`: NF4 weights for QLoRA (CUDA only);
    `dtype`: the weights' dtype (default: model.dtype's for weights no trainer updates; a trained
    policy's is stage_model.trained_dtype)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = dict(
        revision=_revision(source, cfg),
        dtype=dtype or weights_dtype(cfg.dtype, trained=False),
        attn_implementation=cfg.attn_implementation,
    )
    if quantize_4bit:
        import torch
        from transformers import BitsAndBytesConfig
        from transformers.integrations import is_deepspeed_zero3_enabled

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # ZeRO-3 partitions floating-point tensors only: the packed 4-bit weights are stored as bf16
            bnb_4bit_quant_storage=torch.bfloat16 if is_deepspeed_zero3_enabled() else torch.uint8,
        )
    if kind == "reward":
        return AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, pad_token_id=pad_token_id, **kwargs
        )
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def on_accelerator(model: PreTrainedModel) -> PreTrainedModel:
    """A model loaded for evaluation (on the CPU) moved to this process's GPU, where there is one."""
    import os

    import torch

    if model.device.type != "cpu" or not torch.cuda.is_available() or getattr(model, "is_quantized", False):
        return model
    return model.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
