"""Sampling completions from a stage's model for the online stages.

transformers' `generate` on the model in memory; vLLM instead when it is installed and a CUDA
GPU is present (`engine: auto`), which loads the model folder itself. Sampling is seeded per
batch of prompts, so a generation that was interrupted and resumed gives the same replies.

    replies = Sampler(model, tokenizer, settings, folder).sample(prompts, seed=0)   # k per prompt
    replies, details = sampler.sample_with_details(prompts, seed=0)   # and each reply's ReplyDetail
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from posttrain import models

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ENGINES = ("auto", "transformers", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    num_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    # auto: vLLM when installed and a CUDA GPU is present, else transformers
    engine: str = "auto"


@dataclass(frozen=True)
class ReplyDetail:
    # the reply ran to max_new_tokens without its end token
    cut: bool
    # mean entropy (nats) of the model's distribution at the sampling temperature over the reply's
    # tokens (before top_p, as TRL's GRPO logs it); None where the engine does not give it (vLLM)
    entropy: float | None


def vllm_usable() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def engine_for(settings: SamplingSettings) -> str:
    if settings.engine == "auto":
        return "vllm" if vllm_usable() else "transformers"
    return settings.engine


class Sampler:
    """`sample(prompts, seed)`: `num_samples` replies (text) to each prompt (a list of messages)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: SamplingSettings, folder):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.engine = engine_for(settings)
        self._llm = None
        if self.engine == "vllm":
            from vllm import LLM

            # the model folder (the parent artifact), read by vLLM itself
            self._llm = LLM(model=str(folder), tokenizer=str(folder), seed=0, gpu_memory_utilization=0.5)

    def texts(self, prompts: list[list[dict]]) -> list[str]:
        return [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]

    def sample(self, prompts: list[list[dict]], seed: int) -> list[list[str]]:
        return self.sample_with_details(prompts, seed)[0]

    def sample_with_details(
        self, prompts: list[list[dict]], seed: int
    ) -> tuple[list[list[str]], list[list[ReplyDetail]]]:
        """`num_samples` replies to each prompt, and whether each was cut and its entropy."""
        if self._llm is not None:
            return self._sample_vllm(prompts, seed)
        return self._sample_transformers(prompts, seed)

    def _sample_transformers(self, prompts, seed):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class EntropyRecorder(LogitsProcessor):
            """Records the entropy of each step's distribution at the sampling temperature (generate
            runs it before its own temperature and top_p, and it leaves the scores as they are)."""

            def __init__(self):
                self.steps = []

            def __call__(self, input_ids, scores):
                probs = torch.softmax(scores.float() / s.temperature, dim=-1)
                self.steps.append(torch.special.entr(probs).sum(-1))
                return scores

        s, tokenizer = self.settings, self.tokenizer
        recorder = EntropyRecorder()
        self.model = models.on_accelerator(self.model).eval()
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            enc = tokenizer(self.texts(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed)
            with torch.no_grad():
                out = self.model.generate(
                    **enc.to(self.model.device),
                    do_sample=True,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=0,
                    max_new_tokens=s.max_new_tokens,
                    num_return_sequences=s.num_samples,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    logits_processor=LogitsProcessorList([recorder]),
                )
        finally:
            tokenizer.padding_side = padding_side
        new = out[:, enc["input_ids"].shape[1] :]
        replies = tokenizer.batch_decode(new, skip_special_tokens=True)
        ended = new == tokenizer.eos_token_id
        # tokens up to and including the end token (all of them when it never came)
        lengths = torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1])
        entropy = torch.stack(recorder.steps, dim=1)[:, : new.shape[1]]
        counted = torch.arange(entropy.shape[1]) < lengths[:, None].cpu()
        means = ((entropy.cpu() * counted).sum(1) / counted.sum(1).clamp(min=1)).tolist()
        details = [ReplyDetail(cut=not e, entropy=m) for e, m in zip(ended.any(1).tolist(), means, strict=True)]
        k = s.num_samples
        return (
            [[r.strip() for r in replies[i * k : (i + 1) * k]] for i in range(len(prompts))],
            [details[i * k : (i + 1) * k] for i in range(len(prompts))],
        )

    def _sample_vllm(self, prompts, seed):
        from vllm import SamplingParams

        s = self.settings
        params = SamplingParams(
            n=s.num_samples, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=seed
        )
        outputs = self._llm.generate(self.texts(prompts), params, use_tqdm=False)
        return (
            [[c.text.strip() for c in out.outputs] for out in outputs],
            [[ReplyDetail(cut=c.finish_reason == "length", entropy=None) for c in out.outputs] for out in outputs],
        )

    def close(self) -> None:
        """Free vLLM's GPU memory before the next stage trains."""
        if self._llm is not None:
            import gc

            import torch

            del self._llm
            self._llm = None
            gc.collect()
            torch.cuda.empty_cache()
