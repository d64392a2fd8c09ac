"""Padding-free batches (`<stage>.padding_free: true`) train exactly what padded batches train:
each example's loss and gradients, and the trainer's loss and gradients, equal the padded batch's
within 1e-5 (the tiny model, through the stages' own trainers: TRL's SFT collator, posttrain's
packed preference collator around TRL's DPO loss), under sdpa and eager attention."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from posttrain import models, padding_free
from posttrain.config import ModelConfig
from posttrain.stages import STAGES
from posttrain.stages.base import TrainerInputs

TOLERANCE = 1e-5


def tiny(tmp_path, attn: str):
    cfg = ModelConfig(attn_implementation=attn)
    source = models.base_model_source(cfg, tmp_path / "cache")
    return models.load_tokenizer(source, cfg), models.load_model(source, cfg)


def make_trainer(method: str, stage_fields: dict, tokenizer, model, rows, tmp_path):
    stage = STAGES[method].config_cls(method=method, padding_free=True, max_length=64, **stage_fields)
    args = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_length=64,
        use_cpu=True, bf16=False,
        report_to="none", max_steps=1, disable_tqdm=True,
    )  # fmt: skip
    inputs = TrainerInputs(
        cfg=stage, model=model, ref_model=None, tokenizer=tokenizer, train_dataset=Dataset.from_list(rows),
        eval_dataset=None, args=args, peft_config=None,
    )  # fmt: skip
    return STAGES[method].make_trainer(inputs)


def gradients(loss, model) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def assert_close_gradients(packed: list, padded: list) -> None:
    worst = max(
        (a - b).abs().max().item() for a, b in zip(packed, padded, strict=True) if a is not None and b is not None
    )
    assert worst < TOLERANCE, f"gradients differ by {worst:.2e}"


def conversation(i: int) -> list[dict]:
    # replies and prompts of different lengths, so a padded batch holds padding
    return [
        {"role": "user", "content": f"Reverse {'abcdefgh'[: 2 + i % 5]}" + " please" * (i % 3)},
        {"role": "assistant", "content": "hgfedcba"[: 1 + (3 * i) % 7]},
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sft_padding_free_equals_padded_per_example(tmp_path, attn):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer, model = tiny(tmp_path, attn)
    trainer = make_trainer("sft", {}, tokenizer, model, [{"messages": conversation(i)} for i in range(4)], tmp_path)
    rows = [trainer.train_dataset[i] for i in range(4)]
    packed = trainer.data_collator(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one row, no padding
    assert packed["input_ids"].shape[1] == padded["attention_mask"].sum() < padded["input_ids"].numel()

    model = trainer.model.train()  # with TRL's fused LM head
    out_packed = model(**packed, fused_lm_head=True)
    out_padded = model(**padded, fused_lm_head=True)
    starts = packed["cu_seq_lens_q"].tolist()
    for i, (start, end) in enumerate(zip(starts, starts[1:], strict=False)):
        # example i's tokens scored at packed positions start .. end - 2, padded row i's 0 .. n - 2
        mine = out_packed.log_probs[0, start : end - 1]
        theirs = out_padded.log_probs[i, : end - 1 - start]
        assert (mine - theirs).abs().max() < TOLERANCE
        count = out_padded.label_mask[i].sum()
        loss_packed, loss_padded = -mine.sum() / count, -theirs.sum() / count
        assert abs(loss_packed.item() - loss_padded.item()) < TOLERANCE
        assert_close_gradients(gradients(loss_packed, model), gradients(loss_padded, model))

    # the trainer's own loss of the whole micro-batch
    model.zero_grad()
    loss_packed = trainer.compute_loss(model, dict(packed))
    loss_padded = trainer.compute_loss(model, dict(padded))
    assert abs(loss_packed.item() - loss_padded.item()) < TOLERANCE
    assert_close_gradients(gradients(loss_packed, model), gradients(loss_padded, model))


def pair(i: int) -> dict:
    prompt = conversation(i)[:1]
    good = conversation(i)[1]["content"]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": good[::-1] + "x" * (i % 4)}],
    }


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dpo_padding_free_equals_padded_per_example(tmp_path, attn):
    tokenizer, model = tiny(tmp_path, attn)
    fields = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "precompute_ref_log_probs": True}
    trainer = make_trainer("dpo", fields, tokenizer, model, [pair(i) for i in range(4)], tmp_path)
    assert isinstance(trainer.data_collator, padding_free.PackedPreferenceCollator)
    rows = [trainer.train_dataset[i] for i in range(4)]
    packed, padded = trainer.data_collator(rows), trainer.data_collator.padded(rows)
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    assert packed["input_ids"].shape[1] < padded["input_ids"].numel()  # the padded batch pads
    # the reference log-probs were precomputed through the packed path: they equal the padded ones
    with torch.no_grad():
        ref_padded = torch.cat(trainer.compute_ref_log_probs(trainer.model, dict(padded)))
    ref_packed = torch.cat([packed["ref_chosen_logps"], packed["ref_rejected_logps"]])
    assert (ref_packed - ref_padded).abs().max() < TOLERANCE

    model = trainer.model.train()
    labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)
    model_inputs = {k: padded[k] for k in ("input_ids", "attention_mask")}
    out_padded = model(**model_inputs, labels=labels, fused_lm_head=True)
    out_packed = padding_free.PackedForward(model, packed)(fused_lm_head=True)
    assert out_packed.log_probs.shape == out_padded.log_probs.shape
    # each sequence's log-prob sum (what DPO's loss is made of) and its gradients
    for row in range(out_padded.log_probs.shape[0]):
        mine, theirs = out_packed.log_probs[row].sum(), out_padded.log_probs[row].sum()
        assert abs(mine.item() - theirs.item()) < TOLERANCE
        assert_close_gradients(gradients(mine, model), gradients(theirs, model))

    # TRL's DPO loss (sigmoid + sft), its metrics, and its gradients
    trainer._metrics["train"].clear()
    loss_packed = trainer.compute_loss(model, dict(packed))
    metrics_packed = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss_padded = trainer.compute_loss(model, dict(padded))
    metrics_padded = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert abs(loss_packed.item() - loss_padded.item()) < TOLERANCE
    assert_close_gradients(gradients(loss_packed, model), gradients(loss_padded, model))
    for key in ("rewards/margins", "logps/chosen", "logps/rejected", "mean_token_accuracy", "entropy"):
        assert abs(metrics_packed[key] - metrics_padded[key]) < 1e-4, key


@pytest.mark.parametrize("method", ["orpo", "cpo", "simpo"])
def test_orpo_cpo_simpo_padding_free_equal_padded_per_example(tmp_path, method):
    """TRL's experimental trainers pad their own batches: the forward packs them (UnpaddedForward).
    Each pair's log-probs, the NLL term, the trainer's loss and its gradients equal the padded run's."""
    tokenizer, model = tiny(tmp_path, "sdpa")
    trainer = make_trainer(method, {}, tokenizer, model, [pair(i) for i in range(4)], tmp_path)
    assert type(trainer).__name__.startswith("PaddingFree")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    parent = type(trainer).__mro__[1]  # TRL's own trainer class
    packed = trainer.concatenated_forward(model, batch)
    padded = parent.concatenated_forward(trainer, model, batch)
    attention = parent.concatenated_inputs(batch)["concatenated_attention_mask"]
    assert not attention.all()  # the padded batch pads: there is something to leave out
    for i in (0, 1):  # chosen and rejected log-probs, per pair
        assert (packed[i] - padded[i]).abs().max() < TOLERANCE
        for row in range(packed[i].shape[0]):
            assert_close_gradients(gradients(packed[i][row], model), gradients(padded[i][row], model))
    assert abs(packed[4].item() - padded[4].item()) < TOLERANCE  # the NLL term
    loss_packed, _ = trainer.get_batch_loss_metrics(model, batch)
    loss_padded = padded_loss(trainer, parent, model, batch)
    assert abs(loss_packed.item() - loss_padded.item()) < TOLERANCE
    assert_close_gradients(gradients(loss_packed, model), gradients(loss_padded, model))


def padded_loss(trainer, parent, model, batch):
    """The trainer's loss with TRL's own (padded) concatenated forward."""
    own = trainer.concatenated_forward
    trainer.concatenated_forward = lambda m, b: parent.concatenated_forward(trainer, m, b)
    try:
        return parent.get_batch_loss_metrics(trainer, model, batch)[0]
    finally:
        trainer.concatenated_forward = own
