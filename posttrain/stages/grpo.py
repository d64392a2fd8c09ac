"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), TRL GRPOTrainer.

Each step samples `num_generations` replies per prompt from the policy, scores them with the
stage's reward source (posttrain/rewards.py), and raises the likelihood of replies that beat
their group's mean reward. `beta` weighs a KL penalty to the stage's parent (0: no reference
model is loaded). Generation runs on vLLM (colocated) when it is installed and a GPU is
present, else transformers' `generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from posttrain.config import require
from posttrain.data.builtin import task_of
from posttrain.distributed import distributed
from posttrain.generation import Sampler, SamplingSettings, vllm_usable
from posttrain.stages.band import BandConfig, band_callback, band_sampler, pass_rates
from posttrain.stages.base import OnlineStageConfig, StageSpec, TrainerInputs, last_turn_text

if TYPE_CHECKING:
    from posttrain.preemption import PreemptionGuard

# TRL 1.16's GRPO losses (luspo needs importance_sampling_level: sequence)
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


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
    # optimizer steps each generated batch is split over (null: gradient_accumulation_steps, TRL's
    # default); above 1 the later steps are off-policy, so the ratio moves and clipping acts
    steps_per_generation: int | None = None
    # upper clipping bound 1 + epsilon_high (DAPO's clip-higher; null: epsilon)
    epsilon_high: float | None = None
    # replies cut at max_completion_length are left out of the loss (DAPO)
    mask_truncated_completions: bool = False
    # the policy ratio per token or per sequence (GSPO; luspo needs sequence)
    importance_sampling_level: str = "token"
    # train only on prompts whose pass rate under the current model lies in a band (null: every
    # prompt); see posttrain/stages/band.py
    band: BandConfig | None = None
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
        require(
            self.scale_rewards in SCALE_REWARDS,
            f"{key}.scale_rewards",
            f"{self.scale_rewards!r} is not one of {allowed}",
        )
        spg = self.steps_per_generation
        require(spg is None or spg >= 1, f"{key}.steps_per_generation", f"{spg} must be >= 1 or null")
        high = self.epsilon_high
        require(
            high is None or high >= self.epsilon, f"{key}.epsilon_high", f"{high} must be >= epsilon ({self.epsilon})"
        )
        level = self.importance_sampling_level
        allowed = ", ".join(IMPORTANCE_SAMPLING_LEVELS)
        require(
            level in IMPORTANCE_SAMPLING_LEVELS,
            f"{key}.importance_sampling_level",
            f"{level!r} is not one of {allowed}",
        )
        if self.band is not None:
            self.band.validate(f"{key}.band")
        require(
            self.loss_type != "luspo" or level == "sequence",
            f"{key}.loss_type",
            "luspo scales sequence-level ratios; set importance_sampling_level: sequence",
        )


def prompts_for_steps(stage: GRPOStageConfig, world: int) -> int | None:
    """The prompts `max_steps` optimizer steps read. TRL samples a generation batch of
    per_device_train_batch_size x world x steps_per_generation replies (num_generations per
    prompt) and trains steps_per_generation x num_iterations micro-steps on it, of which
    gradient_accumulation_steps make an optimizer step; whole generation batches, so the last
    step has its prompts. With a band, none: the band picks its prompts from the whole set."""
    if stage.band is not None:
        return None
    per_generation = stage.steps_per_generation or stage.gradient_accumulation_steps
    micro_steps = stage.max_steps * stage.gradient_accumulation_steps
    generations = math.ceil(micro_steps / (per_generation * stage.num_iterations))
    return generations * stage.per_device_train_batch_size * world * per_generation // stage.num_generations


def trl_config() -> type:
    from trl import GRPOConfig

    return GRPOConfig


def trl_rewards(inputs: TrainerInputs) -> list:
    """The stage's reward sources as TRL calls them (message lists in, one float per reply out),
    each named after its source, so TRL logs `rewards/<source>/mean` for each."""
    return [_trl_reward(source) for source in inputs.reward.sources]


def _trl_reward(source):
    def reward_fn(prompts, completions, **kwargs) -> list[float]:
        return source([last_turn_text(p) for p in prompts], [last_turn_text(c) for c in completions])

    reward_fn.__name__ = source.name
    return reward_fn


def task_rewards(trainer) -> None:
    """Log the sampled reward of each built-in task (`rewards/task/<task>`) beside TRL's metrics:
    the combined reward of the replies to that task's prompts, as TRL sums it."""
    from accelerate.utils import gather_object

    original = trainer._calculate_rewards

    def calculate(inputs, prompts, completions, completion_ids_list):
        rewards_per_func = original(inputs, prompts, completions, completion_ids_list)  # every rank's rows
        texts = gather_object([last_turn_text(p) for p in prompts])
        combined = (rewards_per_func * trainer.reward_weights.to(rewards_per_func.device)).nansum(dim=1).tolist()
        by_task: dict[str, list[float]] = {}
        for prompt, reward in zip(texts, combined, strict=True):
            by_task.setdefault(task_of(prompt) or "other", []).append(reward)
        mode = "train" if trainer.model.training else "eval"
        for task, values in sorted(by_task.items()):
            trainer._metrics[mode][f"rewards/task/{task}"].append(sum(values) / len(values))
        return rewards_per_func

    trainer._calculate_rewards = calculate


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
        epsilon_high=cfg.epsilon_high,
        num_iterations=cfg.num_iterations,
        steps_per_generation=cfg.steps_per_generation,
        mask_truncated_completions=cfg.mask_truncated_completions,
        importance_sampling_level=cfg.importance_sampling_level,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        reward_weights=inputs.reward.weights,
        use_vllm=vllm_usable(),
        vllm_mode="colocate",
    )
    kwargs = inputs.trainer_kwargs()
    kwargs["eval_dataset"] = None  # held out: exact match and response loss after the stage
    trainer_cls = GRPOTrainer if cfg.band is None else band_trainer(GRPOTrainer)
    trainer = trainer_cls(reward_funcs=trl_rewards(inputs), args=args, **kwargs)
    task_rewards(trainer)
    if inputs.guard is not None:
        stop_during_generation(trainer, inputs.guard)
    if cfg.band is not None:
        score = band_scorer(trainer, inputs)
        trainer.add_callback(band_callback(trainer, cfg.band, score, seed=args.seed))
    return trainer


def stop_during_generation(trainer, guard: PreemptionGuard) -> None:
    """A stop signal during a step's sampling and scoring ends it within seconds; the step is redone
    from the last checkpoint. One process: Preempted is raised at once, where the work is. Several:
    a rank may not leave alone (ZeRO-3 generates in lockstep, one collective per token, and the step
    gathers every rank's replies), so each rank's `generate` ends at the next token once the stop
    reached it (a signal, or the head's stop file), and then every rank asks the others (a
    collective) and all stop together."""
    if not distributed():
        generate_and_score = trainer._generate_and_score_completions

        def interruptible(*args, **kwargs):
            with guard.interruptible(f"GRPO's generation (step {trainer.state.global_step + 1})"):
                return generate_and_score(*args, **kwargs)

        trainer._generate_and_score_completions = interruptible
        return
    generate_turn = trainer._generate_single_turn

    def stoppable(*args, **kwargs):
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        generate = model.generate  # the model's own, bound

        def generate_until_stopped(*gen_args, **gen_kwargs):
            given = gen_kwargs.pop("stopping_criteria", None) or []
            return generate(*gen_args, stopping_criteria=[*given, guard.stopping_criterion()], **gen_kwargs)

        model.generate = generate_until_stopped
        try:
            completions = generate_turn(*args, **kwargs)
        finally:
            del model.generate
        guard.check(f"during GRPO's generation (step {trainer.state.global_step + 1})")
        return completions

    trainer._generate_single_turn = stoppable


def band_trainer(grpo_trainer: type) -> type:
    """GRPOTrainer whose prompt sampler draws from the prompts in the band (posttrain/stages/band.py)."""
    from trl.trainer.utils import RepeatSampler

    class BandGRPOTrainer(grpo_trainer):
        def _get_train_sampler(self, dataset=None):
            made = super()._get_train_sampler(dataset)
            sampler = band_sampler(RepeatSampler)(
                data_source=made.data_source,
                mini_repeat_count=made.mini_repeat_count,
                batch_size=made.batch_size,
                repeat_count=made.repeat_count,
                shuffle=True,
                seed=made.seed,
            )
            self.band_sampler = sampler
            return sampler

    return BandGRPOTrainer


def band_scorer(trainer, inputs: TrainerInputs):
    """`score(indices)` -> the pass rate of each train prompt at `indices` under the current model:
    each rank samples `band.samples` replies to its share of them, every rank gets all the rates."""
    from accelerate.utils import gather_object
    from trl.models import unwrap_model_for_generation

    cfg: GRPOStageConfig = inputs.cfg
    band = cfg.band
    settings = SamplingSettings(band.samples, cfg.temperature, cfg.top_p, cfg.max_completion_length, "transformers")

    def score(indices: list[int]) -> list[float]:
        rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
        mine = indices[rank::world]
        prompts = [trainer.train_dataset[i]["prompt"] for i in mine]
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            was_training = model.training
            try:
                replies = Sampler(model, inputs.tokenizer, settings, None).sample(
                    prompts, seed=trainer.state.global_step
                )
            finally:
                model.train(was_training)
        texts = [last_turn_text(p) for p in prompts for _ in range(band.samples)]
        rewards = inputs.reward(texts, [r for group in replies for r in group]) if mine else []
        rates = gather_object(
            [(i, rate) for i, rate in zip(mine, pass_rates(rewards, band.samples, band.pass_reward), strict=True)]
        )
        by_index = dict(rates)
        return [by_index[i] for i in indices]

    return score


STAGE = StageSpec(
    config_cls=GRPOStageConfig,
    data_kind="prompt",
    uses_reference=False,
    make_trainer=make_trainer,
    trl_config=trl_config,
    summary_metrics=(("train_reward_first", "reward_start"), ("train_reward", "reward_end")),
    uses_reward=True,
    rows_for_steps=prompts_for_steps,
)
