"""Padding-free batches for the preference stages: a micro-batch's rows in one row, no padding.

TRL 1.16's DPOTrainer ignores `padding_free=True` ("temporarily unavailable after a refactor").
This puts it back around TRL rather than in a fork of it:

    collator = PackedPreferenceCollator(DataCollatorForPreference(pad_token_id=tok.pad_token_id))
    trainer_cls = padding_free_trainer(DPOTrainer)      # then trainer_cls(..., data_collator=collator)

The collator runs TRL's own (same truncation), then drops the padding: the 2B rows (chosen rows,
then rejected) become one row of T tokens whose `position_ids` restart at 0 for each row, with
`seq_lengths` (2B) to undo it. transformers (5.x) reads rows packed this way from the position
ids when no attention mask is given: flash-attention runs them as variable-length sequences
(`cu_seq_lens`, given too), sdpa, eager and flex attention under a block-diagonal causal mask.
Either way no token attends to another row's, and the first token of each row predicts nothing.

The trainer's override runs the model once on the packed row, scatters its per-token outputs
(log-probs, entropy, ... of TRL's fused LM head: one number per token, no vocabulary axis) back to
the padded layout [2B, L-1] TRL's loss reads, and hands them to TRL's own `_compute_loss` and
`compute_ref_log_probs` through a stand-in model: every loss type, metric and the precomputed
reference stay TRL's code. A reference computed at every step (precompute_ref_log_probs=false)
runs padded, on the padded view of the same rows.

TRL's experimental ORPO and CPO (SimPO) trainers collate and pad their own batches and read the
full logits: for them `unpadded_trainer` packs each padded batch inside the forward instead
(UnpaddedForward), so the transformer still computes no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# keys of a packed batch that are not the model's inputs
PACKED_ONLY = ("seq_lengths", "completion_mask", "ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PackedPreferenceCollator:
    """TRL's preference collator with the padding taken out: `input_ids`, `completion_mask` and
    `position_ids` of shape [1, T], `seq_lengths` [2B], the varlen kernels' `cu_seq_lens_*` and
    `max_length_*`, and the reference log-probs when the rows hold them."""

    padded: Any  # trl.trainer.dpo_trainer.DataCollatorForPreference

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return pack(self.padded(examples))


def pack(batch: dict[str, Any]) -> dict[str, Any]:
    """A right-padded preference batch (input_ids, attention_mask, completion_mask) as one row."""
    import torch

    keep = batch["attention_mask"].bool()
    lengths = keep.sum(dim=1)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "completion_mask")}
    out["input_ids"] = batch["input_ids"][keep][None]
    out["completion_mask"] = batch["completion_mask"][keep][None]
    out["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    out["seq_lengths"] = lengths
    cu_seq_lens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
    out["max_length_q"] = out["max_length_k"] = int(lengths.max())
    return out


def padded_view(inputs: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """The padded batch TRL's loss reads (input_ids, attention_mask, completion_mask, reference
    log-probs) from a packed one: row r holds packed positions start_r .. start_r + n_r - 1."""
    import torch

    lengths = inputs["seq_lengths"]
    starts = lengths.cumsum(0) - lengths
    column = torch.arange(int(lengths.max()), device=lengths.device)
    valid = column[None] < lengths[:, None]
    index = (starts[:, None] + column[None]).clamp(max=int(lengths.sum()) - 1)
    view = {k: v for k, v in inputs.items() if k in ("ref_chosen_logps", "ref_rejected_logps")}
    view["input_ids"] = inputs["input_ids"][0][index].masked_fill(~valid, pad_token_id)
    view["attention_mask"] = valid.long()
    view["completion_mask"] = inputs["completion_mask"][0][index] * valid
    return view


def unpack_outputs(outputs, lengths):
    """TRL's fused-LM-head outputs of a packed row ([1, T-1]: position t scores token t+1) in the
    padded layout [rows, L-1], zero past each row's end; the last token of a row (which would
    score the next row's first token) is dropped, as padding drops it."""
    import torch

    starts = lengths.cumsum(0) - lengths
    column = torch.arange(int(lengths.max()) - 1, device=lengths.device)
    valid = column[None] < (lengths - 1)[:, None]
    index = (starts[:, None] + column[None]).clamp(max=outputs.log_probs.size(1) - 1)
    fields = {}
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
        value = getattr(outputs, name, None)
        if value is not None:
            fields[name] = value[0][index] & valid if value.dtype == torch.bool else value[0][index] * valid
    return type(outputs)(loss=outputs.loss, aux_loss=getattr(outputs, "aux_loss", None), **fields)


def packed_labels(inputs: dict[str, Any]):
    """The packed row's labels: its completion tokens; no row's first token is a label (it would
    be scored from the previous row's last token)."""
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    return labels.masked_fill(inputs["position_ids"] == 0, -100)


class PackedForward:
    """A stand-in for the model in TRL's loss code: called with the padded view's arguments, it
    runs the real model on the packed row (at call time, inside whatever context TRL set: no_grad,
    adapters off, autocast) and returns the outputs in the padded layout."""

    def __init__(self, model, inputs: dict[str, Any]):
        self.model, self.inputs = model, inputs

    def __call__(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:  # TRL's logits for compute_metrics: the padded view, as TRL passes it
            return self.model(*args, **kwargs)
        packed = {k: v for k, v in self.inputs.items() if k not in PACKED_ONLY}
        extra = {k: kwargs[k] for k in ("output_router_logits",) if k in kwargs}
        outputs = self.model(**packed, **extra, use_cache=False, labels=packed_labels(self.inputs), fused_lm_head=True)
        return unpack_outputs(outputs, self.inputs["seq_lengths"])


class UnpaddedForward:
    """For TRL's experimental ORPO and CPO/SimPO trainers, which run the model on a padded batch of
    chosen and rejected rows and read its full logits: the model runs on the real tokens packed into
    one row (positions restarting per row), and the logits come back in the padded layout, zero at
    padding (where the labels are -100). The transformer computes no padding; the logits tensor
    keeps its padded shape, as those trainers take it."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None or bool(attention_mask.all()):
            return self.model(input_ids, attention_mask=attention_mask, **kwargs)
        batch = pack({"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": attention_mask})
        packed = {k: v for k, v in batch.items() if k not in ("completion_mask", "seq_lengths")}
        outputs = self.model(**packed, **kwargs)
        mask = attention_mask.bool()[..., None].expand(*input_ids.shape, outputs.logits.size(-1))
        outputs.logits = outputs.logits.new_zeros(mask.shape).masked_scatter(mask, outputs.logits[0])
        return outputs


def unpadded_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (TRL's experimental ORPOTrainer or CPOTrainer) whose concatenated chosen and
    rejected forward runs padding-free (UnpaddedForward)."""

    class PaddingFreeTrainer(trainer_cls):
        def concatenated_forward(self, model, batch):
            return super().concatenated_forward(UnpaddedForward(model), batch)

    PaddingFreeTrainer.__name__ = f"PaddingFree{trainer_cls.__name__}"
    return PaddingFreeTrainer


def padding_free_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (TRL's DPOTrainer or a subclass) taking packed batches from
    PackedPreferenceCollator, and padded ones as before."""

    class PaddingFreeTrainer(trainer_cls):
        def _compute_loss(self, model, inputs, return_outputs):
            if "seq_lengths" not in inputs:
                return super()._compute_loss(model, inputs, return_outputs)
            view = padded_view(inputs, self._tokenizer.pad_token_id)
            return super()._compute_loss(PackedForward(model, inputs), view, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            if "seq_lengths" not in inputs:
                return super().compute_ref_log_probs(model, inputs)
            view = padded_view(inputs, self._tokenizer.pad_token_id)
            return super().compute_ref_log_probs(PackedForward(model, inputs), view)

    PaddingFreeTrainer.__name__ = f"PaddingFree{trainer_cls.__name__}"
    return PaddingFreeTrainer
