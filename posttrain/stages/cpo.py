"""Contrastive Preference Optimization (Xu et al. 2024): a reference-free DPO-style loss on the
policy's own log-probs plus an NLL term on the chosen reply (weight `cpo_alpha`).
TRL keeps it in `trl.experimental.cpo`; SimPO (`simpo.py`) is the same trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import StageConfig, require
from posttrain.padding_free import unpadded_trainer
from posttrain.stages.base import StageSpec, TrainerInputs

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


@dataclass
class CPOStageConfig(StageConfig):
    # defaults (conf/align/cpo.yaml holds the same)
    method: str = "cpo"
    init_from: str = "sft"
    learning_rate: float = 1e-6
    # beta: temperature of the preference loss
    beta: float = 0.1
    loss_type: str = "sigmoid"
    # weight of the NLL on the chosen reply (the paper's behaviour-cloning regularizer)
    cpo_alpha: float = 1.0
    # SimPO's target reward margin gamma (loss_type simpo only)
    simpo_gamma: float = 0.5
    # conservative DPO: share of labels assumed flipped (sigmoid only)
    label_smoothing: float = 0.0

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.beta > 0, f"{key}.beta", f"{self.beta} must be > 0")
        allowed = ", ".join(LOSS_TYPES)
        require(self.loss_type in LOSS_TYPES, f"{key}.loss_type", f"unknown {self.loss_type!r}; allowed: {allowed}")
        require(self.cpo_alpha >= 0, f"{key}.cpo_alpha", f"{self.cpo_alpha} must be >= 0")
        require(0 <= self.label_smoothing < 0.5, f"{key}.label_smoothing", "must be in [0, 0.5)")


def trl_config() -> type:
    from trl.experimental.cpo import CPOConfig

    return CPOConfig


def make_trainer(inputs: TrainerInputs):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg: CPOStageConfig = inputs.cfg
    args = CPOConfig(
        **inputs.args,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        cpo_alpha=cfg.cpo_alpha,
        simpo_gamma=cfg.simpo_gamma,
        label_smoothing=cfg.label_smoothing,
    )
    # padding_free: the concatenated forward packs each padded batch (posttrain/padding_free.py)
    trainer_cls = unpadded_trainer(CPOTrainer) if cfg.padding_free else CPOTrainer
    return trainer_cls(args=args, **inputs.trainer_kwargs())


STAGE = StageSpec(
    config_cls=CPOStageConfig,
    data_kind="preference",
    uses_reference=False,
    make_trainer=make_trainer,
    trl_config=trl_config,
    padding_free=True,
    summary_metrics=(("eval_rewards/accuracies", "reward_acc"), ("eval_rewards/margins", "reward_margin")),
)
