"""TRL's fused LM head on a CPU: score only the positions that have a label.

TRL 1.16 patches every policy with a fused LM head (`trl.trainer.utils.add_fused_lm_head`): the
per-token log-probs are computed in vocabulary tiles, without the (batch, length, vocab) logits,
and the tiles are recomputed in the backward pass. On CUDA/XPU it projects only the positions
whose next token has a label (`compact`); on any other device it projects every position, prompt
and padding included, so that Neuron's compiler sees one tile shape per batch shape. A CPU has
no such compiler: there the full projection only adds work. On the built-in tasks a reply is 3
of a row's ~23 tokens, so the LM head (a fifth of SmolLM2's weights, run four times per step by
the recomputing backward) projected every prompt token for nothing.

`score_labelled_positions_only()` makes TRL take its compact path on a CPU as well: the same
kernel on the same rows' hidden states, fewer of them. Values at labelled positions are the same
math (tests/test_fused_head.py compares them); the others were zeros and stay zeros.
"""

from __future__ import annotations

# devices TRL projects every position on, where posttrain projects the labelled ones only
COMPACT_DEVICES = ("cpu",)


def score_labelled_positions_only() -> bool:
    """Patch TRL's choice of the compact path (idempotent). Returns whether TRL's fused head is
    the one this was written against (TRL >= 1.17 may choose otherwise; then nothing changes)."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
        from trl.trainer import utils
    except ImportError:
        return False
    if getattr(utils._use_triton, "posttrain_compact", False):
        return True
    if utils._use_triton is not _use_triton:
        return False

    def compact(device) -> bool:
        return _use_triton(device) or device.type in COMPACT_DEVICES

    compact.posttrain_compact = True
    # only the fused forward's `compact = _use_triton(device)` reads this name; the kernels read
    # their own module's, so the CPU keeps its torch tiles
    utils._use_triton = compact
    return True


def trl_as_installed() -> None:
    """Undo score_labelled_positions_only (a benchmark measures TRL as a user installs it)."""
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer import utils

    utils._use_triton = _use_triton
