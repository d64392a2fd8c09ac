"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024), TRL KTOTrainer.

Trains on single replies labelled desirable or not (no pairs needed); a preference source
is split into two rows per pair (chosen: desirable, rejected: undesirable). The reference
is the stage's parent unless `reference` names another stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import StageConfig, require
from posttrain.ref_logps import with_cached_reference
from posttrain.stages.base import StageSpec, TrainerInputs

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOStageConfig(StageConfig):
    # defaults (conf/align/kto.yaml holds the same)
    method: str = "kto"
    init_from: str = "sft"
    learning_rate: float = 5e-7
    # beta: how far the policy may move from the reference (higher: closer)
    beta: float = 0.1
    # lambda_D / lambda_U in the paper: weights of desirable and undesirable replies; the
    # paper keeps lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    # the reference's log-probs computed once before training and kept beside the reference
    precompute_ref_log_probs: bool = True

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.beta > 0, f"{key}.beta", f"{self.beta} must be > 0")
        for name in ("desirable_weight", "undesirable_weight"):
            require(getattr(self, name) > 0, f"{key}.{name}", f"{getattr(self, name)} must be > 0")
        allowed = ", ".join(LOSS_TYPES)
        require(self.loss_type in LOSS_TYPES, f"{key}.loss_type", f"unknown {self.loss_type!r}; allowed: {allowed}")
        # TRL's KL estimate pairs each reply with its batch neighbours: it needs two per batch
        micro = self.per_device_train_batch_size
        require(micro == "auto" or micro > 1, f"{key}.per_device_train_batch_size", "KTO needs >= 2")


def trl_config() -> type:
    from trl import KTOConfig

    return KTOConfig


def make_trainer(inputs: TrainerInputs):
    from trl import KTOConfig, KTOTrainer
    from trl.trainer import kto_trainer

    cfg: KTOStageConfig = inputs.cfg
    args = dict(inputs.args)
    # KTO's KL term pairs each reply with its neighbours in a fixed-order batch
    args.pop("train_sampling_strategy", None)
    args = KTOConfig(
        **args,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        loss_type=cfg.loss_type,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
    )
    # the KL term's neighbours depend on the batch size and the order of the rows
    cache = inputs.ref_logps if cfg.precompute_ref_log_probs else None
    settings = f"{args.max_length}|kto|{args.per_device_train_batch_size}"
    trainer_cls = with_cached_reference(KTOTrainer, kto_trainer, cache, settings)
    kwargs = inputs.trainer_kwargs()
    # TRL reads the rows in their order (sequential sampling) and takes each row's KL reply from
    # its neighbour: a seeded shuffle first, so that steps mix the data and a pair's two rows
    # (adjacent as a preference source is split) rarely give each other's KL reply
    kwargs["train_dataset"] = kwargs["train_dataset"].shuffle(seed=args.seed)
    return trainer_cls(ref_model=inputs.ref_model, args=args, **kwargs)


STAGE = StageSpec(
    config_cls=KTOStageConfig,
    data_kind="unpaired",
    uses_reference=True,
    make_trainer=make_trainer,
    trl_config=trl_config,
    summary_metrics=(("eval_rewards/margins", "reward_margin"), ("eval_kl", "kl")),
)
