"""LoRA / QLoRA across stages: which model a stage trains, and how its adapter reaches the next.

`peft.handoff: merge` (default): a LoRA stage merges its adapter into the model it saves; the
next stage loads that folder like any other, and its reference is that merged model.

`peft.handoff: stack`: a LoRA stage also writes `adapters.json` (the base folder and every
adapter on it, in order). The next LoRA stage loads that base (4-bit for QLoRA), puts the
earlier adapters on it frozen, and trains a new adapter on top; its reference is the same
model with the new adapter switched off, so no second copy of the weights is loaded. The
base is never rewritten, which is what QLoRA needs (merging into 4-bit weights is lossy).

Either way each stage's folder holds a merged model in plain Hugging Face format (made from
full-precision base weights), plus its own adapter in `adapter/` when `peft.save_adapter`
is set or the handoff is `stack`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain import artifacts

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from posttrain.config import ModelConfig, PeftConfig

LINEAGE = "adapters.json"
ADAPTER_DIR = "adapter"
# the adapter a stage trains (PEFT's default name); TRL adds a copy of it named "ref" and
# computes a PEFT model's reference under `use_adapter(model, "ref")`
NEW, REF = "default", "ref"
STACKED = "_posttrain_stacked"


def lineage(source: str) -> dict[str, Any]:
    """The base folder and adapters an artifact is made of (a merged or full model: itself alone)."""
    return artifacts.read_json(Path(source) / LINEAGE) or {"base": source, "adapters": []}


def lora_config(peft: PeftConfig, model_cfg: ModelConfig, model_kind: str) -> Any:
    """A fresh peft.LoraConfig for one stage."""
    from peft import LoraConfig

    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules or model_cfg.lora_target_modules,
        # a reward model's new scalar head trains in full (PEFT keeps it in `modules_to_save`)
        task_type="SEQ_CLS" if model_kind == "reward" else "CAUSAL_LM",
    )


def with_adapters(model: PreTrainedModel, adapters: list[str]) -> Any:
    """A PeftModel with every adapter in `adapters` loaded, frozen and adding its update."""
    from peft import PeftModel

    names = [f"frozen{i}" for i in range(len(adapters))]
    stacked = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0], is_trainable=False)
    for name, folder in zip(names[1:], adapters[1:], strict=True):
        stacked.load_adapter(folder, adapter_name=name, is_trainable=False)
    stacked.base_model.set_adapter(names)
    return stacked


def stack_adapters(model: PreTrainedModel, adapters: list[str], new_config: Any) -> Any:
    """`model` with the earlier `adapters` on it, frozen, and a new trainable adapter on top."""
    stacked = with_adapters(model, adapters)
    frozen = list(stacked.peft_config)
    stacked.add_adapter(NEW, new_config)
    stacked.base_model.set_adapter([*frozen, NEW])
    stacked.set_requires_grad(frozen, requires_grad=False)  # set_adapter made them all trainable
    stacked.active_adapter = NEW
    setattr(stacked, STACKED, True)
    route_reference_to_stack()
    return stacked


@contextlib.contextmanager
def without_new_adapter(model: Any):
    """A stacked model as its reference: the frozen adapters on, the new one's update scaled to 0."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and NEW in m.scaling]
    scales = [m.scaling[NEW] for m in layers]
    for layer in layers:
        layer.scaling[NEW] = 0.0
    try:
        yield
    finally:
        for layer, scale in zip(layers, scales, strict=True):
            layer.scaling[NEW] = scale


def route_reference_to_stack() -> None:
    """TRL computes a PEFT model's reference under `use_adapter(model, "ref")` (its copy of the
    new adapter as it was at the start), which leaves only that adapter on; for a stacked model
    the reference is every adapter but the new one."""
    from trl.trainer import dpo_trainer, kto_trainer

    for module in (dpo_trainer, kto_trainer):
        original = module.use_adapter
        if getattr(original, STACKED, False):
            continue

        def routed(model, adapter_name, _original=original):
            if getattr(model, STACKED, False) and adapter_name == REF:
                return without_new_adapter(model)
            return _original(model, adapter_name)

        setattr(routed, STACKED, True)
        module.use_adapter = routed


def resume_new_adapter(trainer: Any) -> None:
    """transformers resumes a PEFT model by making its first active adapter the only one, and
    trainable (for a stacked model, a frozen one); a stacked model's checkpoint instead restores
    the new adapter's weights and keeps the stack as it is."""

    def load(checkpoint: str, model: Any = None) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model or trainer.model, weights, adapter_name=NEW)

    trainer._load_from_checkpoint = load


def gathered_states(trained: Any, merge: bool, main: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Under ZeRO-3 (every rank calls it; one parameter gathered at a time, so no process ever
    holds more than its partition and one whole parameter): on the `main` rank, (the merged
    model's state dict if `merge`, else {}; the new adapter's state dict, in PEFT's names); ({},
    {}) on the others.

    Merged weights are PEFT's merge: base + the sum over the active adapters of scale x B @ A,
    added in float32 and stored in the base weight's dtype."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    adapter = {name: p for name, p in trained.named_parameters() if p.requires_grad}  # the new adapter's
    for name, param in adapter.items():
        with GatheredParameters([param]):
            if main:
                adapter[name] = param.detach().cpu().clone()
    if not merge:
        return merged, adapter if main else {}
    base = trained.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in base.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if any(part in name for part in (".lora_", ".original_module.")):
            continue  # adapter weights are merged into their layer; a head PEFT trains replaces its original
        layer = layers.get(owner.removesuffix(".base_layer")) if owner.endswith(".base_layer") else None
        lora = _lora_parameters(layer) if layer is not None and leaf == "weight" else []
        with GatheredParameters([param, *lora]):
            if main:
                value = param.detach().float()
                for active in layer.active_adapters if lora else []:
                    value = value + layer.get_delta_weight(active).float()
                merged[_plain_name(name)] = value.to(param.dtype).cpu().clone()
    return merged, adapter if main else {}


def _lora_parameters(layer: Any) -> list[Any]:
    """The A and B matrices of every active adapter of a LoRA layer."""
    return [p for a in layer.active_adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]


def _plain_name(name: str) -> str:
    """A parameter's name in the model without PEFT's wrappers (a LoRA layer's base weight, a
    trained head's copy)."""
    return name.replace(".base_layer.", ".").replace(f".modules_to_save.{NEW}.", ".")


def quantized(model: Any) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None


def save_adapter(
    trained: Any, folder: Path, base: str, earlier: list[str], stack: bool, state_dict: dict | None = None
) -> list[str]:
    """Write the stage's own adapter to `folder/adapter/` (its weights from `state_dict` when
    given: gathered under ZeRO-3); for `stack` also its lineage. Returns every adapter of the
    stage's model, in order."""
    own = folder / ADAPTER_DIR
    trained.save_pretrained(own, selected_adapters=[NEW], state_dict=state_dict)
    adapters = [*earlier, str(own.resolve())]
    if stack:
        artifacts.write_json_atomic(folder / LINEAGE, {"base": base, "adapters": adapters})
    return adapters
