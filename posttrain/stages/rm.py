"""Reward model (Bradley-Terry, Ouyang et al. 2022): the parent model with a scalar head,
trained so the chosen reply scores above the rejected one (TRL RewardTrainer).

The artifact is a `*ForSequenceClassification` model (num_labels=1) that a later RL stage
or a reward source loads with `AutoModelForSequenceClassification.from_pretrained`. It does
not generate, so a causal-LM stage cannot start from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import StageConfig, require
from posttrain.stages.base import StageSpec, TrainerInputs


@dataclass
class RMStageConfig(StageConfig):
    # defaults (conf/align/rm.yaml holds the same)
    method: str = "rm"
    init_from: str = "sft"
    # weight of the penalty pulling the mean reward to 0 (Eisenstein et al. 2023); null: none
    center_rewards_coefficient: float | None = None

    def validate(self, key: str) -> None:
        super().validate(key)
        coefficient = self.center_rewards_coefficient
        require(coefficient is None or coefficient >= 0, f"{key}.center_rewards_coefficient", "must be >= 0 or null")


def trl_config() -> type:
    from trl import RewardConfig

    return RewardConfig


def make_trainer(inputs: TrainerInputs):
    from trl import RewardConfig, RewardTrainer

    cfg: RMStageConfig = inputs.cfg
    args = RewardConfig(**inputs.args, center_rewards_coefficient=cfg.center_rewards_coefficient)
    return RewardTrainer(args=args, **inputs.trainer_kwargs())


STAGE = StageSpec(
    config_cls=RMStageConfig,
    data_kind="preference",
    uses_reference=False,
    make_trainer=make_trainer,
    trl_config=trl_config,
    summary_metrics=(("eval_accuracy", "reward_acc"), ("eval_margin", "reward_margin")),
    model_kind="reward",
)
