"""Stage registry: a method name -> its StageSpec. Adding a method is one file and one line here."""

from __future__ import annotations

from posttrain.stages import dpo, orpo, sft
from posttrain.stages.base import StageSpec

STAGES: dict[str, StageSpec] = {
    "sft": sft.STAGE,
    "dpo": dpo.STAGE,
    "orpo": orpo.STAGE,
}
