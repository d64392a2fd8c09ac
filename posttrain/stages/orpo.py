"""Odds Ratio Preference Optimization (Hong et al. 2024): SFT loss plus an odds-ratio
penalty on the rejected reply, no reference model. TRL keeps it in `trl.experimental.orpo`.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import StageConfig, require
from posttrain.padding_free import unpadded_trainer
from posttrain.stages.base import StageSpec, TrainerInputs


@dataclass
class ORPOStageConfig(StageConfig):
    # defaults (conf/align/orpo.yaml holds the same)
    method: str = "orpo"
    init_from: str = "sft"
    learning_rate: float = 8e-6
    # lambda in the paper: weight of the odds-ratio term against the SFT loss
    beta: float = 0.1

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.beta > 0, f"{key}.beta", f"{self.beta} must be > 0")


def trl_config() -> type:
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


def make_trainer(inputs: TrainerInputs):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg: ORPOStageConfig = inputs.cfg
    args = ORPOConfig(**inputs.args, beta=cfg.beta)
    # padding_free: the concatenated forward packs each padded batch (posttrain/padding_free.py)
    trainer_cls = unpadded_trainer(ORPOTrainer) if cfg.padding_free else ORPOTrainer
    return trainer_cls(args=args, **inputs.trainer_kwargs())


STAGE = StageSpec(
    config_cls=ORPOStageConfig,
    data_kind="preference",
    uses_reference=False,
    make_trainer=make_trainer,
    trl_config=trl_config,
    padding_free=True,
    summary_metrics=(("eval_rewards/accuracies", "reward_acc"), ("eval_rewards/margins", "reward_margin")),
)
