"""What the benchmarks share: a random-init Llama of a chosen size saved as a local folder (loaded
back with from_pretrained, like a user's model), variable-length conversational data, a
results file per benchmark and a printed table."""

from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path

from posttrain.fused_head import trl_as_installed  # noqa: F401 (the benches import it from here)
from posttrain.report.table import markdown_table

RESULTS = Path(__file__).parent / "results"
WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
# name -> LlamaConfig fields; "20m" is the CPU default of the field notes, "qwen0.5b" Qwen2.5-0.5B's
# shape, "qwen0.5b-6l" the same layers (no q/k/v biases) 6 deep with a 32k vocabulary: 119M parameters
SIZES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    ),
    "20m": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8
    ),
    "qwen0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
# Qwen2.5-0.5B's layers, 6 of them, and a 32k vocabulary: 119M parameters (bench/memory.py)
SIZES["qwen0.5b-6l"] = {**SIZES["qwen0.5b"], "num_hidden_layers": 6, "vocab_size": 32768}
MODEL_REGISTRY = Path(__file__).resolve().parents[1] / "conf" / "model"
REGISTRY_NAMES = [p.stem for p in sorted(MODEL_REGISTRY.glob("*.yaml")) if p.stem != "tiny"]
SIZE_HELP = f"{', '.join(SIZES)}, or a registry model's shape: {', '.join(REGISTRY_NAMES)}"


def registry_shape(size: str) -> dict | None:
    """`model.architecture` of conf/model/<size>.yaml (its config.json's numbers), or None."""
    import yaml

    path = MODEL_REGISTRY / f"{size}.yaml"
    if not path.is_file():
        return None
    shape = yaml.safe_load(path.read_text()).get("architecture")
    return {k: v for k, v in shape.items() if v is not None} if shape else None


def stage_trainer(cfg, name: str, model_dir: Path, rows: list[dict], out: Path, extra_args: dict):
    """Stage `name`'s trainer on `rows` as posttrain/stage_run.py's train_stage builds it: training
    arguments for the device (with `extra_args`), the policy in its trained dtype, the stage's
    reward sources and optimizer."""
    from datasets import Dataset

    from posttrain import models
    from posttrain.rewards import load_rewards
    from posttrain.stage_model import trained_dtype
    from posttrain.stage_run import use_stage_optimizer
    from posttrain.stages import STAGES
    from posttrain.stages.base import TrainerInputs, training_args

    stage = cfg.stages[name]
    spec = STAGES[stage.method]
    tokenizer = models.load_tokenizer(str(model_dir), cfg.model)
    train_args = training_args(spec, stage, cfg, out) | extra_args
    model = models.load_model(
        str(model_dir), cfg.model, pad_token_id=tokenizer.pad_token_id, dtype=trained_dtype(stage, cfg)
    )
    reward = None
    if spec.uses_reward:
        reward = load_rewards(stage.reward, stage.reward_weights, f"{name}.reward", {}, cfg.model, tokenizer)
    inputs = TrainerInputs(
        cfg=stage, model=model, ref_model=None, tokenizer=tokenizer, train_dataset=Dataset.from_list(rows),
        eval_dataset=None, args=train_args, peft_config=None, reward=reward,
    )  # fmt: skip
    trainer = spec.make_trainer(inputs)
    use_stage_optimizer(trainer, stage, train_args)
    return trainer


def build_model(size: str, folder: Path, seq: int) -> Path:
    """A random-init model of `size` with the built-in tokenizer (its few hundred tokens; the
    embedding has the size's vocabulary): a Llama of SIZES, or a registry model's shape built
    with its own model_type (on a GPU in bf16, so an 8B model builds in seconds), saved locally."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain import models
    from posttrain.config import ModelConfig

    tokenizer = models.load_tokenizer(models.base_model_source(ModelConfig(), folder / "cache"), ModelConfig())
    shape = registry_shape(size)
    if shape is None and size not in SIZES:
        raise SystemExit(f"--size {size!r}: not one of {SIZE_HELP}")
    if shape is None:
        shape = {"model_type": "llama", "vocab_size": len(tokenizer), "tie_word_embeddings": True, **SIZES[size]}
    model_type = shape.pop("model_type")
    shape["max_position_embeddings"] = max(seq, 256, shape.get("max_position_embeddings", 0))
    config = AutoConfig.for_model(
        model_type, **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    out = folder / f"model-{size}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def real_model(name: str) -> Path:
    """The weights of registry model `name` as posttrain loads them (a package's GGUF file
    dequantized into posttrain's cache once; a hub id from the hub's cache): real weights, its own
    tokenizer and chat template."""
    from posttrain import checkpoints
    from posttrain.cli import compose_tree
    from posttrain.plan import load_config

    cfg = load_config(compose_tree([f"model={name}", "run.tuned_for=null", "align=none"]))
    return Path(checkpoints.resolve(cfg.model, cfg.run.cache_path))


def conversations(n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """Chat rows whose lengths spread from ~1/8 of `max_tokens` to all of it (~35-45% padding in
    random batches), in the `messages` format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.randint(max_tokens // 16, max_tokens // 2 - 8)  # ~2 tokens per word with the tiny BPE
        user = " ".join(rng.choice(WORDS) for _ in range(max(2, words // 4)))
        reply = " ".join(rng.choice(WORDS) for _ in range(max(2, words - words // 4)))
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
    return rows


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def report(name: str, header: list[str], rows: list[list], records: list[dict]) -> None:
    """Print the table and append each record (with time and device) to results/<name>.jsonl."""
    print(markdown_table(header, [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device_name()}
    with (RESULTS / f"{name}.jsonl").open("a") as f:
        for record in records:
            f.write(json.dumps(stamp | record) + "\n")
