"""SimPO (Meng et al. 2024): the length-normalized log-prob of a reply is its reward, with a
target margin gamma between chosen and rejected; no reference model. TRL's CPOTrainer with
`loss_type=simpo`; `cpo_alpha > 0` adds CPO's NLL term (CPO-SimPO).
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import require
from posttrain.stages import cpo
from posttrain.stages.base import StageSpec


@dataclass
class SimPOStageConfig(cpo.CPOStageConfig):
    # defaults (conf/align/simpo.yaml holds the same)
    method: str = "simpo"
    # beta: reward scale (the paper uses 2.0-10.0; its gamma/beta ratio matters most)
    beta: float = 2.0
    loss_type: str = "simpo"
    # gamma: target margin between the chosen and rejected rewards
    simpo_gamma: float = 0.5
    # pure SimPO has no NLL term
    cpo_alpha: float = 0.0

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.loss_type == "simpo", f"{key}.loss_type", "simpo's loss is simpo; for others use method cpo")


STAGE = StageSpec(
    config_cls=SimPOStageConfig,
    data_kind="preference",
    uses_reference=False,
    make_trainer=cpo.make_trainer,
    trl_config=cpo.trl_config,
    padding_free=True,
    summary_metrics=cpo.STAGE.summary_metrics,
)
