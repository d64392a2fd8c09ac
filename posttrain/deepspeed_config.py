"""DeepSpeed's json for one stage, written from `deepspeed:` (DeepSpeedConfig) and the stage's
training arguments, so batch sizes, clipping and precision never disagree with the trainer.

    ds = deepspeed_json(cfg.deepspeed, stage, world, precision(args), hidden_size)
"""

from __future__ import annotations

from typing import Any

from posttrain.config import ConfigError, DeepSpeedConfig, StageConfig, global_batch


def precision(args: dict[str, Any]) -> str:
    """bf16, fp16 or fp32: how a stage's training arguments run (DeepSpeed's json must agree)."""
    return "bf16" if args["bf16"] else "fp16" if args["fp16"] else "fp32"


def deepspeed_json(
    ds: DeepSpeedConfig, stage: StageConfig, world: int, precision: str, hidden_size: int | None = None
) -> dict[str, Any]:
    """DeepSpeed's config for one stage, every value the training arguments also set written out
    (DeepSpeed's and the trainer's batch sizes, clipping and precision cannot disagree).

    `precision`: bf16, fp16 or fp32, as the trainer runs; `hidden_size` sizes the buckets (as
    transformers' "auto" would; left "auto" when unknown). With optimizer offload DeepSpeed's own
    CPU Adam takes the stage's learning rate and weight decay (offloading a torch optimizer is
    what DeepSpeed refuses); otherwise the trainer's AdamW and scheduler run as without DeepSpeed.
    """
    if ds.stage is None:
        raise ConfigError("deepspeed.stage: null has no DeepSpeed config")
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size or (hidden_size**2 if hidden_size else "auto"),
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        # the final model is saved whole, in plain Hugging Face format, not as ZeRO shards
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size**2) if hidden_size else "auto"
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size if hidden_size else "auto"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.per_device_train_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "train_batch_size": global_batch(stage, world),
        "gradient_clipping": stage.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own prints would repeat it
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": stage.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": stage.weight_decay,
            },
        }
    return _merged(config, ds.extra)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
