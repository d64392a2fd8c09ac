"""Stage registry: a method name -> its StageSpec. Adding a method is one file and one line here."""

from __future__ import annotations

from posttrain.stages import cpo, dpo, grpo, kto, orpo, pairs, rm, sft, simpo
from posttrain.stages.base import StageSpec

STAGES: dict[str, StageSpec] = {
    "sft": sft.STAGE,
    "dpo": dpo.STAGE,
    "orpo": orpo.STAGE,
    "kto": kto.STAGE,
    "cpo": cpo.STAGE,
    "simpo": simpo.STAGE,
    "rm": rm.STAGE,
    "pairs": pairs.STAGE,
    "grpo": grpo.STAGE,
}
