"""Direct Preference Optimization (Rafailov et al. 2023), TRL DPOTrainer.

The reference model is the parent stage's output. `loss_type: [sigmoid, sft]` adds the
negative log-likelihood of the chosen reply to the DPO loss (RPO, Pang et al. 2024),
which keeps the policy from drifting away from correct answers while it pushes the
rejected ones down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import StageConfig, require
from posttrain.padding_free import PackedPreferenceCollator, padding_free_trainer
from posttrain.ref_logps import with_cached_reference
from posttrain.stages.base import StageSpec, TrainerInputs

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


@dataclass
class DPOStageConfig(StageConfig):
    # defaults (conf/align/dpo.yaml holds the same)
    method: str = "dpo"
    init_from: str = "sft"
    learning_rate: float = 5e-7
    # inverse temperature of the implicit reward; higher keeps the policy closer to the reference
    beta: float = 0.1
    # TRL loss types, summed with loss_weights
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid", "sft"])
    loss_weights: list[float] | None = field(default_factory=lambda: [1.0, 1.0])
    # the reference's log-probs computed once before training and kept on disk beside the
    # reference (reused by later stages and sweep points); false: a reference forward per step
    precompute_ref_log_probs: bool = True

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.beta > 0, f"{key}.beta", f"{self.beta} must be > 0")
        for name in self.loss_type:
            require(name in LOSS_TYPES, f"{key}.loss_type", f"unknown {name!r}; allowed: {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None:
            require(
                len(self.loss_weights) == len(self.loss_type),
                f"{key}.loss_weights",
                f"has {len(self.loss_weights)} weights for {len(self.loss_type)} loss types",
            )


def trl_config() -> type:
    from trl import DPOConfig

    return DPOConfig


def make_trainer(inputs: TrainerInputs):
    from trl import DPOConfig, DPOTrainer
    from trl.trainer import dpo_trainer

    cfg: DPOStageConfig = inputs.cfg
    args = DPOConfig(
        **inputs.args,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        loss_weights=cfg.loss_weights,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=inputs.args["per_device_eval_batch_size"],
    )
    # the collator truncates to max_length: part of what the log-probs are of
    cache = inputs.ref_logps if cfg.precompute_ref_log_probs else None
    trainer_cls = with_cached_reference(DPOTrainer, dpo_trainer, cache, f"{args.max_length}|{args.truncation_mode}")
    collator = None
    if cfg.padding_free:  # TRL 1.16 ignores its own padding_free for DPO: posttrain/padding_free.py
        trainer_cls = padding_free_trainer(trainer_cls)
        collator = PackedPreferenceCollator(
            dpo_trainer.DataCollatorForPreference(
                pad_token_id=inputs.tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        )
    # ref_model is None when the policy (still equal to the reference) computes them
    return trainer_cls(ref_model=inputs.ref_model, args=args, data_collator=collator, **inputs.trainer_kwargs())


STAGE = StageSpec(
    config_cls=DPOStageConfig,
    data_kind="preference",
    uses_reference=True,
    make_trainer=make_trainer,
    trl_config=trl_config,
    padding_free=True,
    summary_metrics=(("eval_rewards/accuracies", "reward_acc"), ("eval_rewards/margins", "reward_margin")),
)
