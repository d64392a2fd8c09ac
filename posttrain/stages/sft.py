"""Supervised fine-tuning on conversations, loss on assistant tokens only (TRL SFTTrainer)."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import StageConfig, require
from posttrain.stages.base import StageSpec, TrainerInputs, batch_rows_for_steps


@dataclass
class SFTStageConfig(StageConfig):
    # defaults (conf/sft/default.yaml holds the same)
    method: str = "sft"
    init_from: str = "base"
    learning_rate: float = 2e-5
    # loss on assistant replies only (needs a chat template with a generation block)
    assistant_only_loss: bool = True
    # pack several conversations into one row (BFD; attention stays within each conversation)
    packing: bool = False

    def validate(self, key: str) -> None:
        super().validate(key)
        require(not (self.packing and self.max_length is None), f"{key}.packing", "needs max_length set")


def trl_config() -> type:
    from trl import SFTConfig

    return SFTConfig


def make_trainer(inputs: TrainerInputs):
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cfg: SFTStageConfig = inputs.cfg
    args = SFTConfig(**inputs.args, assistant_only_loss=cfg.assistant_only_loss, packing=cfg.packing)
    collator = None
    if cfg.padding_free and not cfg.packing:  # packing (BFD) is padding-free already
        # TRL's own padding-free collator (one row, position ids restarting per conversation). Not
        # through SFTConfig(padding_free=True): TRL 1.16 refuses it with max_length set, although
        # it truncates each conversation to max_length while preparing the data either way
        collator = DataCollatorForLanguageModeling(
            pad_token_id=inputs.tokenizer.pad_token_id, padding_free=True, pad_to_multiple_of=args.pad_to_multiple_of
        )
    return SFTTrainer(args=args, data_collator=collator, **inputs.trainer_kwargs())


def rows_for_steps(stage: SFTStageConfig, world: int) -> int | None:
    """max_steps x the global batch, unless packing: a packed row holds as many conversations as fit."""
    return None if stage.packing else batch_rows_for_steps(stage, world)


STAGE = StageSpec(
    config_cls=SFTStageConfig,
    data_kind="sft",
    uses_reference=False,
    make_trainer=make_trainer,
    trl_config=trl_config,
    padding_free=True,
    rows_for_steps=rows_for_steps,
)
