"""The `model` section (conf/model/, one option per model) and the `peft` section (conf/peft/):
what is loaded, its shape for the memory plan, its chat template and end-of-turn token, and how
LoRA/QLoRA adapt it.

    posttrain model=qwen2_5_0_5b model.path=/models/Qwen2.5-0.5B peft=lora
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from posttrain.config.build import check_local_path
from posttrain.errors import require


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
        check_local_path(self.path, "model.path")


# --- peft -------------------------------------------------------------------------------


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
