"""Packing never lets one conversation attend to another: each packed example's logits equal
its logits alone (SFT stage with `packing: true`, TRL's BFD packing, sdpa attention)."""

from __future__ import annotations

import torch
from datasets import Dataset

from posttrain import models
from posttrain.config import ModelConfig
from posttrain.stages import STAGES
from posttrain.stages.base import TrainerInputs


def test_packed_examples_do_not_attend_to_each_other(tmp_path):
    cfg = ModelConfig()
    source = models.base_model_source(cfg, tmp_path / "cache")
    tokenizer, model = models.load_tokenizer(source, cfg), models.load_model(source, cfg).eval()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {2 * i}?"},
                {"role": "assistant", "content": str(3 * i)},
            ]
        }
        for i in range(1, 9)
    ]
    stage = STAGES["sft"].config_cls(method="sft", packing=True, max_length=96)
    args = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_length=96, use_cpu=True,
        report_to="none", max_steps=1, disable_tqdm=True,
    )  # fmt: skip
    inputs = TrainerInputs(
        cfg=stage, model=model, ref_model=None, tokenizer=tokenizer, train_dataset=Dataset.from_list(rows),
        eval_dataset=None, args=args, peft_config=None,
    )  # fmt: skip
    trainer = STAGES["sft"].make_trainer(inputs)
    packed = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed  # one flattened row, positions restart
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist() + [packed["input_ids"].shape[1]]
    assert len(starts) - 1 == len(rows)  # every conversation is in the pack
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        for start, end in zip(starts, starts[1:], strict=False):
            alone = model(input_ids=packed["input_ids"][:, start:end]).logits[0]
            assert torch.allclose(together[start:end], alone, atol=1e-5), f"example at {start} saw another"
