"""The model's own signal as a row's score, where no reward exists (`data.<kind>.score.by`):

    loss   the reply's mean log-likelihood per token under the model, given its prompt (minus the
           mean token loss): a reply the model finds unlikely scores low. Under a model that knows
           the task a wrong reply is unlikely; under one that does not, a long or unusual one is.
    ifd    instruction-following difficulty (Li et al., 2024, "From Quantity to Quality", the
           Cherry data): the reply's loss given its prompt over its loss given an empty prompt.
           Near 0: the instruction makes the reply easy; near 1: the instruction barely helps,
           the rows that paper keeps. A ratio of 1 or more means the instruction does not help
           predict the reply at all (often a reply that does not answer it): such a row scores
           1 - ratio, at most 0, below every other row, so `min_score: 0` drops them.

The model is `score.model`: the base model, or an earlier causal-LM stage of the recipe (a
model already trained on the task knows a wrong reply when it reads one). Both render the
conversation with the chat template the stages train with, and score the reply's tokens
(its end-of-turn token included), as SFT's assistant-only loss counts them.

    scorer = LikelihoodScorer("loss", "/models/base", model_cfg, tokenizer)
    scorer(["What is 2 + 3?"], ["5"])       # [minus the mean loss of the reply "5" and its end token]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from posttrain import models

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from posttrain.config import ModelConfig

# tokens of one scored conversation at most (longer ones are cut from the right)
MAX_TOKENS = 2048
# conversations per forward pass
BATCH = 16


class LikelihoodScorer:
    """`loss` or `ifd` of each reply under the model in `source`; the model loads on the first
    call, so a stage whose scores are all cached never loads it."""

    def __init__(self, kind: str, source: str, model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
        self.kind, self.source, self.model_cfg, self.tokenizer = kind, source, model_cfg, tokenizer
        self.model: PreTrainedModel | None = None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        conditioned = self.reply_losses(prompts, completions)
        if self.kind == "loss":
            return [-loss for loss in conditioned]
        alone = self.reply_losses([""] * len(completions), completions)
        ratios = [c / a if a > 0 else 1.0 for c, a in zip(conditioned, alone, strict=True)]
        return [r if r < 1 else 1 - r for r in ratios]

    def reply_losses(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The mean token loss of each completion after its prompt, longest batches first."""
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        losses = [0.0] * len(encoded)
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            for i, loss in zip(batch, self.batch_losses([encoded[i] for i in batch]), strict=True):
                losses[i] = loss
        return losses

    def encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """The conversation's token ids and where the reply starts."""
        turns = [{"role": "user", "content": prompt}]
        head = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        reply = {"role": "assistant", "content": completion}
        whole = self.tokenizer.apply_chat_template([*turns, reply], tokenize=False)
        head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = self.tokenizer(whole, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
        return ids, min(len(head_ids), len(ids) - 1)

    def batch_losses(self, batch: list[tuple[list[int], int]]) -> list[float]:
        import torch

        model = self.loaded()
        width = max(len(ids) for ids, _ in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = input_ids.clone()
        for row, (ids, start) in enumerate(batch):
            labels[row, :start] = -100
            labels[row, len(ids) :] = -100
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
        labels = labels[:, 1:].to(logits.device)
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        counted = (labels != -100).sum(dim=1).clamp(min=1)
        return (token_loss.sum(dim=1) / counted).cpu().tolist()

    def loaded(self) -> PreTrainedModel:
        if self.model is None:
            self.model = models.on_accelerator(models.load_model(self.source, self.model_cfg)).eval()
        return self.model
