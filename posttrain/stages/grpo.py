"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), TRL GRPOTrainer.

Each step samples `num_generations` replies per prompt from the policy, scores them with the
stage's reward source (posttrain/rewards.py), and raises the likelihood of replies that beat
their group's mean reward. `beta` weighs a KL penalty to the stage's parent (0: no reference
model is loaded). Generation runs on vLLM (colocated) when it is installed and a GPU is
present, else transformers' `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import require
from posttrain.generation import vllm_usable
from posttrain.stages.base import OnlineStageConfig, StageSpec, TrainerInputs

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOStageConfig(OnlineStageConfig):
    # defaults (conf/align/grpo.yaml holds the same)
    method: str = "grpo"
    init_from: str = "sft"
    learning_rate: float = 1e-6
    # sampled replies per device per step (whole groups)
    per_device_train_batch_size: int = 64
    # unused (GRPO cuts no prompt); the value its stage keys were made with
    max_length: int | None = 1024
    # replies sampled per prompt (the group); per_device_train_batch_size counts replies
    num_generations: int = 8
    # KL coefficient to the parent (the reference); 0 loads no reference model
    beta: float = 0.0
    # longest sampled reply, in tokens
    max_completion_length: int = 256
    # PPO-style clipping of the policy ratio
    epsilon: float = 0.2
    # policy updates per generated batch (1: on-policy, the ratio is 1)
    num_iterations: int = 1
    # TRL loss normalisation: grpo (per sequence), dapo (per token over the batch), dr_grpo, ...
    loss_type: str = "dapo"
    # rewards divided by the std of their group, of the batch, or not at all
    scale_rewards: str = "group"

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.num_generations >= 2, f"{key}.num_generations", f"{self.num_generations} must be >= 2")
        replies = self.per_device_train_batch_size * self.gradient_accumulation_steps
        require(
            replies % self.num_generations == 0,
            f"{key}.per_device_train_batch_size",
            f"{self.per_device_train_batch_size} x {self.gradient_accumulation_steps} accumulation = {replies} replies "
            f"per step is not a multiple of num_generations={self.num_generations} (whole groups per step)",
        )
        require(self.beta >= 0, f"{key}.beta", f"{self.beta} must be >= 0")
        require(self.max_completion_length > 0, f"{key}.max_completion_length", "must be > 0")
        require(self.num_iterations >= 1, f"{key}.num_iterations", f"{self.num_iterations} must be >= 1")
        allowed = ", ".join(LOSS_TYPES)
        require(self.loss_type in LOSS_TYPES, f"{key}.loss_type", f"{self.loss_type!r} is not one of {allowed}")
        allowed = ", ".join(SCALE_REWARDS)
        require(self.scale_rewards in SCALE_REWARDS, f"{key}.scale_rewards", f"{self.scale_rewards!r}: {allowed}")


def trl_config() -> type:
    from trl import GRPOConfig

    return GRPOConfig


def trl_reward(inputs: TrainerInputs):
    """The stage's reward source as TRL calls it (message lists in, one float per reply out)."""
    reward = inputs.reward

    def reward_fn(prompts, completions, **kwargs) -> list[float]:
        def text(value) -> str:
            return value if isinstance(value, str) else value[-1]["content"]

        return reward([text(p) for p in prompts], [text(c) for c in completions])

    reward_fn.__name__ = "reward"  # TRL logs rewards/<name>/mean
    return reward_fn


def make_trainer(inputs: TrainerInputs):
    from trl import GRPOConfig, GRPOTrainer

    cfg: GRPOStageConfig = inputs.cfg
    args = dict(inputs.args)
    args.pop("max_length", None)  # GRPO bounds the reply (max_completion_length); prompts are not cut
    args = GRPOConfig(
        **args,
        num_generations=cfg.num_generations,
        beta=cfg.beta,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        max_completion_length=cfg.max_completion_length,
        epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        use_vllm=vllm_usable(),
        vllm_mode="colocate",
    )
    kwargs = inputs.trainer_kwargs()
    kwargs["eval_dataset"] = None  # held out: exact match and response loss after the stage
    return GRPOTrainer(reward_funcs=[trl_reward(inputs)], args=args, **kwargs)


STAGE = StageSpec(
    config_cls=GRPOStageConfig,
    data_kind="prompt",
    uses_reference=False,
    make_trainer=make_trainer,
    trl_config=trl_config,
    summary_metrics=(("train_reward", "train_reward"),),
    uses_reward=True,
)
