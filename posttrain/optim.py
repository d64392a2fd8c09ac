"""AdamW on bf16 weights that keeps small updates: a full fine-tune in 8-10 bytes per parameter.

A stage's `optimizer` picks it (`align.optimizer=adamw_kahan_bf16`); the trained weights then
load in bf16, and this optimizer replaces the trainer's AdamW:

    opt = AdamWBF16(model.parameters(), lr=5e-7, compensation="kahan")

Why: DPO's learning rates (5e-7) move a weight of size ~1e-2 by ~5e-9, far below bf16's
resolution there (2^-8 relative, ~4e-5): `w += update` rounds back to `w` and training silently
does nothing. posttrain's default keeps fp32 master weights for that (16 bytes per parameter
with fp32 gradients and Adam). Here the weights stay bf16 and each step's rounding error is kept:

- `kahan`: Kahan-compensated summation (Kahan 1965; as in Zamirai et al. 2020, "Revisiting
  BFloat16 Training", and torchdistx's AnyPrecisionAdamW). A bf16 buffer c holds what the last
  rounding lost; each step adds (update + c) to the weight and keeps the new remainder in c:
      y = update + c;  w' = bf16(w + y);  c = bf16(y - (w' - w))
  The weight plus its buffer track the fp32 sum to ~2^-16 relative. 2 bytes per parameter.
- `stochastic`: the new weight rounds up or down at random with the probability that makes the
  rounding unbiased (Gupta et al. 2015), E[w'] = w + update: small updates survive on average.
  No buffer.

Adam's moments are kept in bf16 too, stochastically rounded (their per-step increments, a 1e-3
share of exp_avg_sq at beta2 = 0.999, are below bf16's resolution as well and would stop it
moving), and computed in fp32 within each step. The bytes per parameter below are the plan's
(posttrain/memory.py reads them; tests/test_optim.py checks them against the states an optimizer
really holds).
"""

from __future__ import annotations

import functools
import math

# optimizer name -> weight compensation ("kahan" | "stochastic"); "adamw" (absent) is the
# trainer's own torch AdamW on the weights model.dtype gives
BF16_OPTIMIZERS = {"adamw_kahan_bf16": "kahan", "adamw_sr_bf16": "stochastic"}
OPTIMIZERS = ("adamw", *BF16_OPTIMIZERS)
# bytes per trained parameter that each BF16 optimizer holds besides the weights and gradients
# (both bf16): exp_avg and exp_avg_sq in bf16, plus the Kahan buffer
MOMENT_BYTES = 2 + 2
COMPENSATION_BYTES = {"kahan": 2, "stochastic": 0}
# elements updated at once: bounds the step's fp32 temporaries (~10 of them) to ~0.6 GB
CHUNK = 1 << 24


def state_bytes(name: str) -> int:
    """Bytes per parameter of a BF16 optimizer's states (moments and compensation), not weights or gradients."""
    return MOMENT_BYTES + COMPENSATION_BYTES[BF16_OPTIMIZERS[name]]


def __getattr__(name: str):
    # the class subclasses torch.optim.Optimizer: defined on first use, so importing this module
    # (posttrain/config/stage.py reads the names above) does not import torch
    if name == "AdamWBF16":
        return _adamw_bf16()
    raise AttributeError(name)


def optimizer_cls_and_kwargs(name: str, args: dict) -> tuple[type, dict]:
    """transformers.Trainer's `optimizer_cls_and_kwargs` for optimizer `name`, from the stage's
    training arguments (learning rate, betas, epsilon)."""
    kwargs = dict(
        lr=args["learning_rate"],
        betas=(args.get("adam_beta1", 0.9), args.get("adam_beta2", 0.999)),
        eps=args.get("adam_epsilon", 1e-8),
        compensation=BF16_OPTIMIZERS[name],
    )
    return _adamw_bf16(), kwargs


def stochastic_round_(target, value, generator=None) -> None:
    """Write fp32 `value` into bf16 `target`, rounded up or down at random so that the expected
    result is `value` (bf16 keeps the top 16 bits of an fp32: add uniform noise below them, cut)."""
    import torch

    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    rounded = (bits + noise) & -65536  # 0xFFFF0000: clear the 16 bits bf16 drops
    target.copy_(rounded.view(torch.float32))


@functools.cache
def _adamw_bf16() -> type:
    import torch

    class AdamWBF16(torch.optim.Optimizer):
        """AdamW (Loshchilov & Hutter 2019, Algorithm 2: decoupled weight decay) for bf16 weights,
        with Kahan-compensated or stochastically rounded weight updates (see the module docstring).
        Parameters must be bf16; the math of each step runs in fp32."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, compensation="kahan"):
            if compensation not in COMPENSATION_BYTES:
                raise ValueError(f"compensation {compensation!r} is not one of {', '.join(COMPENSATION_BYTES)}")
            defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, compensation=compensation)
            super().__init__(params, defaults)

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.dtype != torch.bfloat16:
                        raise TypeError(f"AdamWBF16 trains bf16 weights; got a {p.dtype} parameter")
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        names = ("exp_avg", "exp_avg_sq") + (
                            ("compensation",) if group["compensation"] == "kahan" else ()
                        )
                        for name in names:
                            state[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["step"] += 1
                    tensors = [p, p.grad, *(state[n] for n in ("exp_avg", "exp_avg_sq", "compensation") if n in state)]
                    if all(t.is_contiguous() for t in tensors):
                        # in slices: the fp32 temporaries of an 8B model's embedding would take ~15 GB
                        slices = zip(*(t.view(-1).split(CHUNK) for t in tensors), strict=True)
                    else:
                        slices = [tensors]
                    for part in slices:
                        self._update(group, state["step"].item(), *part)
            return loss

        @staticmethod
        def _update(group, step, p, grad, exp_avg, exp_avg_sq, compensation=None) -> None:
            beta1, beta2 = group["betas"]
            grad = grad.float()
            m = exp_avg.float().lerp_(grad, 1 - beta1)
            v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            del grad
            stochastic_round_(exp_avg, m)
            stochastic_round_(exp_avg_sq, v)
            denom = v.div_(1 - beta2**step).sqrt_().add_(group["eps"])
            update = m.div_(denom).mul_(-group["lr"] / (1 - beta1**step))
            del denom, v
            weight = p.float()
            if group["weight_decay"]:
                update.add_(weight, alpha=-group["lr"] * group["weight_decay"])
            if compensation is not None:
                update.add_(compensation.float())
                p.add_(update)  # rounds to bf16
                compensation.copy_(update.sub_(p.float().sub_(weight)))  # what the rounding lost
            else:
                stochastic_round_(p, weight.add_(update))

    return AdamWBF16


def bf16_resolution(value: float) -> float:
    """The spacing of bf16 numbers around `value` (for docs and tests)."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7)
