"""Metrics computed the same way for every stage (and for the base model).

- `exact_match`: greedy replies to held-out prompts compared with the reference reply
  (whitespace-stripped). On the built-in tasks that is the task's exact accuracy.
- `response_loss`: mean negative log-likelihood per assistant token of held-out
  conversations; lower means the model predicts the reference replies better.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from posttrain import models
from posttrain.errors import ConfigError
from posttrain.rewards import import_function

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from posttrain.config import EvalConfig


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def exact_match(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset, cfg: EvalConfig
) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy of greedy replies on `rows` (`messages` ending in the reference reply), and every reply."""
    import torch

    conversations = rows["messages"][: cfg.num_prompts]
    tasks = rows["task"][: cfg.num_prompts] if "task" in rows.column_names else [None] * len(conversations)
    records: list[dict[str, Any]] = []
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(conversations), cfg.batch_size):
            batch = conversations[start : start + cfg.batch_size]
            texts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=cfg.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            replies = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for conv, reply, task in zip(batch, replies, tasks[start : start + cfg.batch_size], strict=True):
                reference = conv[-1]["content"].strip()
                records.append(
                    {
                        "task": task,
                        "prompt": conv[-2]["content"],
                        "reference": reference,
                        "reply": reply.strip(),
                        "correct": reply.strip() == reference,
                    }
                )
    finally:
        tokenizer.padding_side = padding_side
    return _accuracy(records), records


def _accuracy(records: list[dict[str, Any]]) -> float:
    return sum(r["correct"] for r in records) / max(len(records), 1)


def accuracy_by_task(records: list[dict[str, Any]]) -> dict[str, float]:
    """`exact_match/<task>` for rows that name their task (the built-in data does)."""
    tasks = sorted({r["task"] for r in records if r["task"] is not None})
    return {f"exact_match/{t}": _accuracy([r for r in records if r["task"] == t]) for t in tasks}


def response_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset, cfg: EvalConfig) -> float:
    """Mean NLL per assistant token over held-out conversations (needs the template's generation marks)."""
    import torch

    conversations = rows["messages"][: cfg.num_loss_rows]
    total, count = 0.0, 0
    model.eval()
    for batch in _batches(conversations, cfg.batch_size):
        enc = tokenizer.apply_chat_template(
            batch,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            padding=True,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].to(model.device)
        labels = input_ids.masked_fill(enc["assistant_masks"].to(model.device) == 0, -100)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=enc["attention_mask"].to(model.device)).logits
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def win_rate(judge: str, records: list[dict[str, Any]], parent_records: list[dict[str, Any]]) -> float | None:
    """Mean judge score of this stage's replies against its parent's on the prompts both answered."""
    parent = {r["prompt"]: r for r in parent_records}
    pairs = [(r, parent[r["prompt"]]) for r in records if r["prompt"] in parent]
    if not pairs:
        return None
    if judge == "exact_match":
        scores = [0.5 + 0.5 * (int(mine["correct"]) - int(theirs["correct"])) for mine, theirs in pairs]
    else:
        function = import_function(judge, "eval.judge")
        prompts = [mine["prompt"] for mine, _ in pairs]
        scores = function(prompts, [mine["reply"] for mine, _ in pairs], [theirs["reply"] for _, theirs in pairs])
        if not isinstance(scores, list | tuple) or len(scores) != len(pairs):
            raise ConfigError(f"eval.judge {judge}: returned {type(scores).__name__}, expected {len(pairs)} scores")
        if not all(isinstance(x, int | float) and 0 <= x <= 1 for x in scores):
            raise ConfigError(f"eval.judge {judge}: scores must be numbers in [0, 1]")
    return sum(scores) / len(scores)


def evaluate_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset | None, eval_cfg: EvalConfig
) -> tuple[dict[str, float], list[dict]]:
    """Response loss and exact match (with every reply) on the held-out conversations."""
    if rows is None:
        return {}, []
    model = models.on_accelerator(model)
    metrics: dict[str, float] = {}
    replies: list[dict] = []
    if models.marks_assistant_tokens(tokenizer):
        metrics["response_loss"] = response_loss(model, tokenizer, rows, eval_cfg)
    if eval_cfg.exact_match or eval_cfg.judge:  # a judge compares generated replies too
        score, replies = exact_match(model, tokenizer, rows, eval_cfg)
        if eval_cfg.exact_match:
            metrics["exact_match"] = score
            metrics.update(accuracy_by_task(replies))
    return metrics, replies
