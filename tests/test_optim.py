"""The bf16 AdamW (posttrain/optim.py): small updates that plain bf16 AdamW rounds away are kept,
it tracks fp32 AdamW, and the states it really holds are the bytes the memory plan counts."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain import memory, optim
from posttrain.config import (
    Config,
    DataConfig,
    DeepSpeedConfig,
    LauncherConfig,
    LoggerConfig,
    ModelConfig,
    PeftConfig,
    RunConfig,
    StageConfig,
    SweepConfig,
)

LR = 1e-6  # DPO's learning rates: 5e-7 (7B models) to 5e-6
STEPS = 400


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of a typical size (~0.02, where bf16's resolution is ~1e-4: a hundred steps' worth)
    and a fixed stream of gradients with a direction per weight (so the weights do move)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(4096, generator=generator) * 0.02
    direction = torch.randn(4096, generator=generator)
    grads = direction + 0.5 * torch.randn(STEPS, 4096, generator=generator)
    return weights, grads


def train(weights: torch.Tensor, grads: torch.Tensor, dtype: torch.dtype, make) -> torch.Tensor:
    p = torch.nn.Parameter(weights.to(dtype).clone())
    opt = make([p])
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach().float()


def torch_adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def bf16_adamw(compensation: str):
    return lambda params: optim.AdamWBF16(params, lr=LR, compensation=compensation)


def test_plain_bf16_adamw_loses_dpo_sized_updates():
    weights, grads = problem()
    start = weights.bfloat16().float()
    plain = train(weights, grads, torch.bfloat16, torch_adamw)
    reference = train(weights, grads, torch.float32, torch_adamw)
    moved = (reference - start).abs().mean()
    assert moved > 2e-4  # fp32 moved the weights ...
    # ... bf16 rounded almost every step back (all but the weights nearest 0: measured 1%)
    assert (plain - start).abs().mean() < 0.05 * moved


@pytest.mark.parametrize("compensation", ["kahan", "stochastic"])
def test_bf16_adamw_tracks_fp32_adamw(compensation):
    weights, grads = problem()
    start = weights.bfloat16().float()
    reference = train(start, grads, torch.float32, torch_adamw)
    mine = train(weights, grads, torch.bfloat16, bf16_adamw(compensation))
    moved, error = (reference - start).abs().mean(), (mine - reference).abs().mean()
    # the weights moved by ~4e-4 each; Kahan keeps the sum to within half of bf16's resolution of
    # the weight itself (~1e-4); stochastic rounding's error is a random walk around the sum
    assert moved > 2e-4
    # (measured: Kahan 8% of the move, stochastic rounding 40%; plain bf16 AdamW 99%)
    assert error < (0.15 if compensation == "kahan" else 0.5) * moved, (compensation, error.item(), moved.item())
    # the direction is right everywhere the update is clear
    clear = (reference - start).abs() > 2 * optim.bf16_resolution(0.02)
    agree = ((mine - start)[clear].sign() == (reference - start)[clear].sign()).float().mean()
    assert clear.sum() > 200 and agree > 0.9


def test_kahan_weight_plus_buffer_is_the_fp32_sum():
    weights, grads = problem()
    start = weights.bfloat16().float()
    reference = train(start, grads, torch.float32, torch_adamw)
    p = torch.nn.Parameter(weights.bfloat16().clone())
    opt = optim.AdamWBF16([p], lr=LR, compensation="kahan")
    for g in grads:
        p.grad = g.bfloat16()
        opt.step()
    total = p.detach().float() + opt.state[p]["compensation"].float()
    # the fp32 run saw fp32 gradients and moments: the remaining gap is bf16 moments' noise
    assert (total - reference).abs().mean() < 0.05 * (reference - start).abs().mean()


def test_weight_decay_is_decoupled_as_in_adamw():
    p32 = torch.nn.Parameter(torch.full((1024,), 1.0))
    p16 = torch.nn.Parameter(torch.full((1024,), 1.0, dtype=torch.bfloat16))
    ref = torch.optim.AdamW([p32], lr=1e-2, weight_decay=0.1)
    mine = optim.AdamWBF16([p16], lr=1e-2, weight_decay=0.1, compensation="kahan")
    for _ in range(50):
        p32.grad = torch.full_like(p32, 0.5)
        p16.grad = torch.full_like(p16, 0.5)
        ref.step()
        mine.step()
    # within a few bf16 steps of 0.46 (2e-3): the moments' stochastic rounding adds noise
    assert (p16.float() - p32).abs().mean() < 2e-3 and (p16.float() - p32).abs().max() < 6e-3


def test_stochastic_rounding_is_unbiased():
    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way between two bf16 numbers
    target = torch.empty_like(value, dtype=torch.bfloat16)
    optim.stochastic_round_(target, value, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(target.float().mean().item() - value[0].item()) < 2e-5


def test_fp32_parameters_are_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="bf16"):
        optim.AdamWBF16([p]).step()


@pytest.mark.parametrize("name", list(optim.BF16_OPTIMIZERS))
def test_the_plan_counts_the_states_the_optimizer_holds(name):
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    cls, kwargs = optim.optimizer_cls_and_kwargs(name, {"learning_rate": 1e-5})
    opt = cls([p], **kwargs)
    p.grad = torch.ones_like(p)
    opt.step()
    held = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.numel() > 1)
    assert held / p.numel() == optim.state_bytes(name)
    # the memory plan: weights and gradients (2 + 2) and those states, per parameter, one process
    stage = StageConfig(method="dpo", optimizer=name)
    cfg = Config(
        run=RunConfig(), model=ModelConfig(), data=DataConfig(), peft=PeftConfig(), deepspeed=DeepSpeedConfig(),
        launcher=LauncherConfig(), logger=LoggerConfig(), sweep=SweepConfig(), stages={"align": stage},
    )  # fmt: skip
    hold = memory.stage_holding(stage, cfg, None, 10**9, on_gpu=True)
    per_gpu, _ = memory.model_states(cfg.deepspeed, hold, 1, 1)
    assert per_gpu / 1e9 == 2 + 2 + optim.state_bytes(name) == {"adamw_kahan_bf16": 10, "adamw_sr_bf16": 8}[name]


def test_a_step_in_slices_equals_a_step_whole(monkeypatch):
    # equal up to the moments' stochastic rounding (the slices draw their noise separately)
    weights, grads = problem()
    start = weights.bfloat16().float()
    whole = train(weights, grads, torch.bfloat16, bf16_adamw("kahan"))
    monkeypatch.setattr(optim, "CHUNK", 1000)  # 4096 weights: slices of 1000, 1000, 1000, 1000, 96
    sliced = train(weights, grads, torch.bfloat16, bf16_adamw("kahan"))
    assert (sliced - whole).abs().mean() < 0.1 * (whole - start).abs().mean()


def test_a_resumed_optimizer_continues_as_the_uninterrupted_one():
    weights, grads = problem()
    p = torch.nn.Parameter(weights.bfloat16().clone())
    opt = optim.AdamWBF16([p], lr=LR, compensation="kahan")
    for g in grads[:10]:
        p.grad = g.bfloat16()
        opt.step()
    # a checkpoint: weights, the optimizer's state, and the RNG (the stochastic rounding draws from it)
    saved_weights, saved_state, saved_rng = p.detach().clone(), copy.deepcopy(opt.state_dict()), torch.get_rng_state()
    for g in grads[10:20]:
        p.grad = g.bfloat16()
        opt.step()
    q = torch.nn.Parameter(saved_weights)
    resumed = optim.AdamWBF16([q], lr=LR, compensation="kahan")
    resumed.load_state_dict(saved_state)
    torch.set_rng_state(saved_rng)
    for g in grads[10:20]:
        q.grad = g.bfloat16()
        resumed.step()
    assert torch.equal(p, q)
