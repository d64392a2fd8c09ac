"""TRL's fused LM head on a CPU: score only the positions that have a label.

TRL 1.16 patches every policy with a fused LM head (`trl.trainer.utils.add_fused_lm_head`): the
per-token log-probs are computed in vocabulary tiles, without the (batch, length, vocab) logits,
and the tiles are recomputed in the backward pass. On CUDA/XPU it projects only the positions
whose next token has a label (`compact`); on any other device it projects every position, prompt
and padding included, so that Neuron's compiler sees one tile shape per batch shape. A CPU has
no such compiler: there the full projection only adds work. On the built-in tasks a reply is 3
of a row's ~23 tokens, so the LM head (a fifth of SmolLM2's weights, run four times per step by
the recomputing backward) projected every prompt token for nothing.

`cpu_lm_head()` changes two things, on a CPU only:
- TRL takes its compact path there as well (`score_labelled_positions_only`): the same kernel on
  the same rows' hidden states, fewer of them. Values at labelled positions are the same math
  (tests/test_fused_head.py compares them); the others were zeros and stay zeros.
- When the labelled positions' logits are small enough to keep (KEEP_LOGITS_BYTES), they are
  computed once and kept for the backward (`keep_small_logits`), as a plain `lm_head` + log-softmax
  would: the tiled kernel recomputes them in its backward, a fourth product of the (tokens x
  vocabulary x hidden) size where three suffice. Larger batches keep TRL's tiles.
"""

from __future__ import annotations

# devices TRL projects every position on, where posttrain projects the labelled ones only
COMPACT_DEVICES = ("cpu",)
# a CPU keeps the labelled positions' logits for the backward when their float32 copies (the
# logits, their gradient and the softmax the backward makes) take at most this
KEEP_LOGITS_BYTES = 2 * 2**30


def cpu_lm_head() -> None:
    """Both changes (idempotent); nothing changes where TRL's layout is not the one expected."""
    score_labelled_positions_only()
    keep_small_logits()


def score_labelled_positions_only() -> bool:
    """Patch TRL's choice of the compact path (idempotent). Returns whether TRL's fused head is
    the one this was written against (TRL >= 1.17 may choose otherwise; then nothing changes)."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:
        return False
    # only the fused forward's `compact = _use_triton(device)` reads this name; the kernels read
    # their own module's, so the CPU keeps its torch tiles
    return _replace_in_trl("_use_triton", _use_triton, compact_on_cpu)


def compact_on_cpu(device) -> bool:
    """TRL's choice of its compact path, and a CPU too."""
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton(device) or device.type in COMPACT_DEVICES


compact_on_cpu.posttrain_compact = True


def keep_small_logits() -> bool:
    """Route TRL's fused head through `KeptOrTiled` (idempotent); whether TRL's layout matched."""
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return False
    return _replace_in_trl("_ChunkedLogProbFunction", ChunkedLogProbFunction, KeptOrTiled)


def _replace_in_trl(name: str, original, replacement) -> bool:
    """`trl.trainer.utils.<name>` = replacement, where it is still TRL's `original` (idempotent);
    whether it is the replacement now."""
    try:
        from trl.trainer import utils
    except ImportError:
        return False
    if getattr(utils, name, None) is original:
        setattr(utils, name, replacement)
    return getattr(utils, name, None) is replacement


class KeptOrTiled:
    """What TRL's fused forward calls as `_ChunkedLogProbFunction.apply(...)`: on a CPU, when the
    logits fit KEEP_LOGITS_BYTES, `kept_logits_log_probs`; otherwise TRL's tiled kernel."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=None):
        from trl.kernels import ChunkedLogProbFunction
        from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS

        outputs = OPTIONAL_OUTPUTS if outputs is None else outputs
        kept_bytes = 3 * 4 * hidden.shape[0] * weight.shape[0]
        if hidden.device.type in COMPACT_DEVICES and kept_bytes <= KEEP_LOGITS_BYTES:
            return kept_logits_log_probs(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs)
        args = (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
        return ChunkedLogProbFunction.apply(*args)


def kept_logits_log_probs(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    """TRL's ChunkedLogProbFunction's outputs (log_probs, entropy, log_sum_sq_probs, mean_logits,
    is_top1; None where not asked), by plain autograd over the (N, V) float32 logits."""
    import torch

    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    with torch.autocast(device.type, enabled=False):
        z = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        z = z.float() * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        log_z = torch.logsumexp(z, dim=-1)
        target_logit = z.gather(1, targets.unsqueeze(1)).squeeze(1)
        log_probs = target_logit - log_z
        entropy = log_sum_sq = mean = top1 = None
        if "entropy" in outputs:
            entropy = log_z - (torch.softmax(z, dim=-1) * z).sum(-1)
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                log_sum_sq = torch.logsumexp(2 * z, dim=-1) - 2 * log_z
            if "mean_logits" in outputs:
                mean = z.mean(-1)
            if "is_top1" in outputs:  # the target is the first index of the largest logit
                top1 = z.argmax(-1) == targets
    return log_probs, entropy, log_sum_sq, mean, top1


def trl_as_installed() -> None:
    """Undo cpu_lm_head (a benchmark measures TRL as a user installs it)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer import utils

    utils._use_triton = _use_triton
    utils._ChunkedLogProbFunction = ChunkedLogProbFunction
