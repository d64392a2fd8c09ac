"""TRL's fused LM head on a CPU after score_labelled_positions_only(): it projects the labelled
positions only, and its log-probs, entropy, loss and gradients equal those of TRL's own
every-position path."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import _use_triton as trl_choice
from trl.trainer import utils as trl_utils
from trl.trainer.utils import add_fused_lm_head

from posttrain.fused_head import score_labelled_positions_only

# TRL's tiled kernel (trl.trainer.utils names it too, or posttrain's KeptOrTiled once a trainer was built)
KERNEL = ChunkedLogProbFunction.apply


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=300)  # fmt: skip
    m = LlamaForCausalLM(config)
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    return m


def batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows whose labels cover only their replies (the last few tokens)."""
    torch.manual_seed(1)
    input_ids = torch.randint(0, 300, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 8:] = input_ids[0, 8:]
    labels[1, 6:9] = input_ids[1, 6:9]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def run(monkeypatch, compact: bool, rows_seen: list[int]):
    """One forward and backward; records how many positions the kernel projected. TRL's own choice
    first (a trainer built earlier in this process has patched it), restored after the test."""
    monkeypatch.setattr(trl_utils, "_use_triton", trl_choice)
    if compact:
        score_labelled_positions_only()

    def counting(hidden, *args):
        rows_seen.append(hidden.shape[0])
        return KERNEL(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
    m = model()
    out = m(**batch(), fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return out, grads


def test_the_cpu_projects_only_labelled_positions_and_computes_the_same(monkeypatch):
    every, compact = [], []
    full_out, full_grads = run(monkeypatch, False, every)
    out, grads = run(monkeypatch, True, compact)
    labelled = int((batch()["labels"][:, 1:] != -100).sum())
    assert every == [2 * 11] and compact == [labelled] and labelled < 11
    mask = full_out.label_mask
    assert torch.equal(mask, out.label_mask)
    for name in ("log_probs", "entropy", "is_top1"):
        a, b = getattr(full_out, name), getattr(out, name)
        assert torch.allclose(a[mask].float(), b[mask].float(), atol=1e-6), name
        assert not b[~mask].any(), f"{name} outside the labels must stay zero"
    assert torch.allclose(full_out.loss, out.loss, atol=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(grad, grads[name], atol=1e-6), name


def test_patching_twice_is_patching_once(monkeypatch):
    monkeypatch.setattr(trl_utils, "_use_triton", trl_choice)
    assert score_labelled_positions_only() and score_labelled_positions_only()
    assert trl_utils._use_triton(torch.device("cpu")) and trl_utils._use_triton.posttrain_compact


def _head_inputs():
    torch.manual_seed(2)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    return hidden, weight, bias, torch.randint(0, 50, (7,))


def test_kept_logits_give_the_tiled_kernels_outputs_and_gradients():
    """keep_small_logits: one product kept for the backward instead of recomputed tiles, same math
    (with a temperature, a logit scale and a softcap, every output TRL can ask for)."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS

    from posttrain.fused_head import kept_logits_log_probs

    results = []
    for compute in (ChunkedLogProbFunction.apply, kept_logits_log_probs):
        hidden, weight, bias, targets = _head_inputs()
        if compute is kept_logits_log_probs:
            out = compute(hidden, weight, bias, targets, 0.7, 30.0, 1.3, OPTIONAL_OUTPUTS)
        else:  # chunks of 16 of the 50 words: the online log-sum-exp over several tiles
            out = compute(hidden, weight, bias, targets, 0.7, 16, 30.0, 1.3, OPTIONAL_OUTPUTS)
        (out[0].sum() + 0.5 * out[1].sum()).backward()
        results.append((out, (hidden.grad, weight.grad, bias.grad)))
    (tiled, tiled_grads), (kept, kept_grads) = results
    for name, a, b in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), tiled, kept, strict=False):
        assert torch.allclose(a, b, atol=1e-5), name
    assert torch.equal(tiled[4], kept[4]), "is_top1"
    for a, b in zip(tiled_grads, kept_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_logits_too_large_to_keep_go_through_the_tiles(monkeypatch):
    from posttrain import fused_head

    calls = []
    monkeypatch.setattr(fused_head, "kept_logits_log_probs", lambda *a: calls.append("kept") or KERNEL(*a[:4], 1.0, 16))
    hidden, weight, bias, targets = _head_inputs()
    fused_head.KeptOrTiled.apply(hidden, weight, bias, targets, 1.0, 16, None, 1.0, ("log_probs",))
    monkeypatch.setattr(fused_head, "KEEP_LOGITS_BYTES", 3 * 4 * 7 * 50 - 1)
    out = fused_head.KeptOrTiled.apply(hidden, weight, bias, targets, 1.0, 16, None, 1.0, ("log_probs",))
    assert calls == ["kept"] and out[0].shape == (7,)
