"""The model a stage trains: loaded per its PEFT method and hand-off (with its reference), in the
dtype it trains in, merged and saved as a plain Hugging Face model.

    policy = build_policy(run, cfg, tokenizer)      # policy.model, policy.peft_config, policy.ref_model
    save_model(run, merged(trained, policy, run, cfg), tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain import artifacts, distributed, models, peft_handoff
from posttrain.config import Config, StageConfig, stage_peft
from posttrain.optim import BF16_OPTIMIZERS
from posttrain.report.plots import plot_curves
from posttrain.stages import STAGES

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from posttrain.stage_run import StageRun


@dataclass
class Policy:
    """The model a stage trains, what it is made of, and its reference."""

    model: PreTrainedModel
    # a LoRA config for the trainer to apply (None: full fine-tuning, or adapters already on)
    peft_config: Any
    # stack hand-off: trained on `base` under the frozen `adapters` (merge: base = the parent)
    stack: bool
    base: str
    adapters: list[str]
    # a separately loaded reference model (None: the policy itself gives the reference)
    ref_model: PreTrainedModel | None


def trains_loaded_weights(stage: StageConfig, cfg: Config) -> bool:
    """Full fine-tuning by a plain trainer updates the loaded weights themselves (so they load as
    fp32 master weights under model.dtype=auto); LoRA trains adapters, DeepSpeed its own fp32 copy."""
    return stage_peft(stage, cfg.peft) == "none" and cfg.deepspeed.stage is None


def trained_dtype(stage: StageConfig, cfg: Config) -> torch.dtype:
    """The dtype a stage's policy loads in: bf16 under a BF16 optimizer (posttrain/optim.py), else
    model.dtype's (models.weights_dtype)."""
    import torch

    if stage.optimizer in BF16_OPTIMIZERS:
        return torch.bfloat16
    return models.weights_dtype(cfg.model.dtype, trains_loaded_weights(stage, cfg))


def saved_dtype(stage: StageConfig, cfg: Config) -> torch.dtype | None:
    """The dtype fp32 master weights are evaluated and saved in: the one they computed in (bf16 on
    a GPU with bf16 units), as a bf16 trainer would save them (half the disk; the dtype hub models
    ship in); None: as trained. `model.dtype=float32` keeps fp32 throughout."""
    if not trains_loaded_weights(stage, cfg):
        return None
    compute = models.compute_dtype(cfg.model.dtype)
    return compute if compute != models.weights_dtype(cfg.model.dtype, trained=True) else None


def build_policy(run: StageRun, cfg: Config, tokenizer) -> Policy:
    """Load the stage's model per its PEFT method and hand-off policy, and its reference if that
    is not the policy itself (before its first step, or with its new adapter off)."""
    spec = STAGES[run.stage.method]
    method = stage_peft(run.stage, cfg.peft)
    stack = method != "none" and cfg.peft.handoff == "stack" and spec.model_kind == "causal_lm"
    # merge: train on the parent's (merged) weights; stack: on its base, under its adapters
    chain = peft_handoff.lineage(run.parent.source) if stack else {"base": run.parent.source, "adapters": []}

    def load(source: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
        return models.load_model(
            source, cfg.model, spec.model_kind, method == "qlora", tokenizer.pad_token_id, dtype=dtype
        )

    model, peft_config = load(chain["base"], dtype=trained_dtype(run.stage, cfg)), None
    if method != "none":
        peft_config = peft_handoff.lora_config(cfg.peft, cfg.model, spec.model_kind)
        if chain["adapters"]:
            model, peft_config = peft_handoff.stack_adapters(model, chain["adapters"], peft_config), None
    reference = run.reference_artifact
    own_reference = reference.key == run.parent.key and (
        method != "none" or getattr(run.stage, "precompute_ref_log_probs", False)
    )
    ref_model = load(reference.source) if spec.uses_reference and not own_reference else None
    return Policy(model, peft_config, stack, chain["base"], chain["adapters"], ref_model)


def save_partitioned_lora(trained, policy: Policy, run: StageRun, cfg: Config) -> None:
    """A LoRA stage under ZeRO-3 (every rank calls it): the merged model and the stage's adapter,
    gathered one parameter at a time and written by rank 0. A 4-bit base is merged again from its
    full-precision weights, as without ZeRO-3."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    main, quantized = distributed.is_main(), stage_peft(run.stage, cfg.peft) == "qlora"
    state, adapter_state = peft_handoff.gathered_states(trained, merge=not quantized, main=main)
    unset_hf_deepspeed_config()  # rank 0's load of a full-precision base must not be partitioned
    if not main:
        return
    if policy.stack or cfg.peft.save_adapter or quantized:
        adapters = peft_handoff.save_adapter(
            trained, run.folder, policy.base, policy.adapters, policy.stack, state_dict=adapter_state
        )
    if quantized:
        state = load_full_precision_merged(run, cfg, policy.base, adapters).state_dict()
    trained.get_base_model().save_pretrained(run.folder, state_dict=state, safe_serialization=True)


def load_saved(run: StageRun, cfg: Config, tokenizer) -> PreTrainedModel:
    kind = STAGES[run.stage.method].model_kind
    return models.load_model(str(run.folder), cfg.model, kind, pad_token_id=tokenizer.pad_token_id)


def merged(trained, policy: Policy, run: StageRun, cfg: Config) -> PreTrainedModel:
    """The trained PEFT model as one plain model; its own adapter saved when the next stage
    stacks on it, when asked, or for QLoRA (merged again from full-precision weights)."""
    adapters = policy.adapters
    if policy.stack or cfg.peft.save_adapter or stage_peft(run.stage, cfg.peft) == "qlora":
        adapters = peft_handoff.save_adapter(trained, run.folder, policy.base, policy.adapters, policy.stack)

    if peft_handoff.quantized(trained):
        return load_full_precision_merged(run, cfg, policy.base, adapters)
    return trained.merge_and_unload()  # merges every active adapter


def load_full_precision_merged(run: StageRun, cfg: Config, base: str, adapters: list[str]) -> PreTrainedModel:
    """The base in full precision with `adapters` merged in (merging into 4-bit weights would
    round the update)."""
    full = models.load_model(base, cfg.model, STAGES[run.stage.method].model_kind)
    return peft_handoff.with_adapters(full, adapters).merge_and_unload()


def save_model(run: StageRun, model: PreTrainedModel, tokenizer) -> None:
    """Model, tokenizer and training curves; a failed write (full disk) is one clear error."""
    from safetensors import SafetensorError

    try:
        if model.name_or_path != str(run.folder):  # else read back from there (ZeRO-3): written already
            model.save_pretrained(run.folder, safe_serialization=True)
        tokenizer.save_pretrained(run.folder)
        plot_curves(run.folder / "metrics.jsonl", run.folder / "curves.png", f"{run.name} ({run.stage.method})")
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise artifacts.ArtifactError(
            f"saving stage {run.name} to {run.folder} failed: {reason}; it is not marked complete and "
            "earlier stages are intact: free space (or fix the folder) and re-run the same command"
        ) from None
