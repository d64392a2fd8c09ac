"""Memory estimates: the activation formula against what a real forward pass keeps, and
`activation_checkpointing: auto` deciding as it would on an 80 GiB GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from posttrain import memory
from posttrain.config import ArchitectureConfig
from posttrain.plan import load_config
from tests.conftest import ANY_MODEL, REPO, compose_tree

GIB = 2**30


SHAPES = [(256, 688, 4, 2, 128), (512, 1376, 2, 2, 256), (128, 352, 4, 1, 256)]


@pytest.mark.parametrize("hidden, intermediate, layers, batch, length", SHAPES)
def test_layer_activations_match_what_a_bf16_forward_saves(hidden, intermediate, layers, batch, length):
    """Every tensor autograd keeps (weights aside) through a bf16 Llama's decoder layers: the
    estimate is within 15% of them."""
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.model(input_ids=ids)  # the decoder layers (and final norm), no LM head
    estimate = batch * length * layers * memory.layer_activation_bytes(ArchitectureConfig.from_json(config.to_dict()))
    assert estimate == pytest.approx(sum(saved.values()), rel=0.15)


@pytest.fixture
def gpu_80gib(monkeypatch):
    """This machine as one with an 80 GiB GPU, for the decision alone (nothing runs on it)."""
    monkeypatch.setattr(memory, "gpu_memory", lambda: 80.0 * GIB)


def config_folder(tmp_path, name, config):
    config.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


LLAMA_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8,
)  # fmt: skip
QWEN_05B = Qwen2Config(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip


@pytest.mark.parametrize(
    "model, overrides, on",
    [
        # 0.5B full fine-tune, 8 x 2048 tokens: ~8 GiB of states and ~46 GiB of activations fit
        (QWEN_05B, ["sft.per_device_train_batch_size=8", "sft.max_length=2048"], False),
        # twice the batch does not
        (QWEN_05B, ["sft.per_device_train_batch_size=16", "sft.max_length=2048"], True),
        # 8B bf16 LoRA, one 2048-token row: 15 GiB of frozen weights and ~16 GiB of activations
        (LLAMA_8B, ["peft=lora", "model.dtype=bfloat16", "sft.per_device_train_batch_size=1"], False),
        # the same at 8 rows
        (LLAMA_8B, ["peft=lora", "model.dtype=bfloat16", "sft.per_device_train_batch_size=8"], True),
    ],
)
def test_auto_checkpointing_turns_on_where_a_gpu_could_not_hold_the_activations(
    tmp_path, gpu_80gib, model, overrides, on
):
    source = config_folder(tmp_path, "model", model)
    cfg = load_config(compose_tree([ANY_MODEL, f"model.path={source}", "sft.max_length=2048", *overrides]))
    decided, why = memory.activation_checkpointing(cfg.stages["sft"], cfg, "sft", source)
    assert decided is on, why
    assert why.endswith("85% of 80.0 GiB")


def test_auto_checkpointing_counts_both_replies_of_a_pair(tmp_path, gpu_80gib):
    """DPO's forward runs chosen and rejected together: the batch that fits SFT does not fit DPO."""
    source = config_folder(tmp_path, "model", QWEN_05B)
    both = ["sft.per_device_train_batch_size=8", "align.per_device_train_batch_size=8", "align.max_length=2048"]
    cfg = load_config(compose_tree([ANY_MODEL, f"model.path={source}", "sft.max_length=2048", *both]))
    assert memory.activation_checkpointing(cfg.stages["sft"], cfg, "sft", source)[0] is False
    assert memory.activation_checkpointing(cfg.stages["align"], cfg, "preference", source)[0] is True


def test_auto_checkpointing_is_off_on_a_cpu_and_a_setting_wins(tmp_path):
    cfg = load_config(compose_tree([]))
    if memory.gpu_memory() is None:
        assert memory.activation_checkpointing(cfg.stages["sft"], cfg, "sft") == (False, "no GPU")
    forced = load_config(compose_tree(["sft.activation_checkpointing=true"]))
    assert memory.activation_checkpointing(forced.stages["sft"], forced, "sft") == (True, "set in the config")


def test_checkpointing_setting_is_checked_and_not_part_of_the_stage_key():
    from posttrain.config import ConfigError
    from posttrain.stage_cache import stage_keys

    with pytest.raises(ConfigError, match=r"sft.activation_checkpointing: 'sometimes' is not one of true, false, auto"):
        load_config(compose_tree(["sft.activation_checkpointing=sometimes"]))
    keys = [stage_keys(load_config(compose_tree([f"sft.activation_checkpointing={v}"]))) for v in (True, False, "auto")]
    assert keys[0] == keys[1] == keys[2]  # the same weights either way: a stage is reused


def test_plan_shows_the_auto_decision_on_a_gpu_machine(tmp_path, gpu_80gib):
    from posttrain.plan import plan_text
    from posttrain.stage_cache import stage_keys

    source = config_folder(tmp_path, "model", QWEN_05B)
    overrides = ["sft.per_device_train_batch_size=16", "sft.max_length=2048", "align.per_device_train_batch_size=4"]
    cfg = load_config(
        compose_tree([ANY_MODEL, f"model.path={source}", f"run.output_dir={tmp_path / 'run'}", *overrides])
    )
    lines = plan_text(cfg, stage_keys(cfg)).splitlines()
    checkpointing = [line.strip() for line in lines if "activation checkpointing" in line]
    assert checkpointing[0].startswith("activation checkpointing: on (model states and activations ~99.3 GiB >")
    assert checkpointing[1].startswith("activation checkpointing: off")


def small(config_class: str, **extra):
    """A small model of a family, in that family's own config class."""
    import transformers

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4)
    return getattr(transformers, config_class)(**{**shape, "num_key_value_heads": 2, **extra})


FAMILY_SHAPES = {
    "llama": small("LlamaConfig"),
    "llama, untied, biased": small("LlamaConfig", tie_word_embeddings=False, attention_bias=True),
    "qwen2": small("Qwen2Config", tie_word_embeddings=True),
    "qwen3": small("Qwen3Config", head_dim=32),
    "mistral": small("MistralConfig"),
    "gemma2": small("Gemma2Config", head_dim=32),
    "gemma3": small("Gemma3TextConfig", head_dim=32),
    "phi3": small("Phi3Config", num_key_value_heads=4, pad_token_id=0),
    # the largest module an MLP projection, not the embedding
    "wide mlp": small("LlamaConfig", intermediate_size=4096),
}


@pytest.mark.parametrize("config", FAMILY_SHAPES.values(), ids=FAMILY_SHAPES)
def test_parameter_counts_from_the_numbers_equal_a_built_models(config):
    """The formula the plan uses (no transformers, no download) against the model transformers
    builds from the same config.json: every parameter, and the largest module's own."""
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in built.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in built.modules())
    assert memory.parameter_counts(ArchitectureConfig.from_json(config.to_dict())) == (total, largest)


# total parameters as the model cards (or the hub's page) state them, in billions
CARD_BILLIONS = {
    "llama3_2_1b": 1.23, "llama3_2_3b": 3.21, "llama3_1_8b": 8.03, "llama3_1_70b": 70.6,
    "qwen2_5_0_5b": 0.49, "qwen2_5_1_5b": 1.54, "qwen2_5_7b": 7.61,
    "qwen3_0_6b": 0.6, "qwen3_1_7b": 1.7, "qwen3_4b": 4.0, "qwen3_8b": 8.2,
    "mistral_7b": 7.24, "mistral_7b_v0_3": 7.25, "gemma2_2b": 2.61, "gemma2_9b": 9.24, "gemma3_1b": 1.0,
    "phi3_mini": 3.8, "phi4_mini": 3.8, "phi4": 14.7, "smollm2_135m": 0.135,
}  # fmt: skip
REGISTRY = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if p.stem != "tiny")


def test_every_registry_model_states_its_card_count():
    assert sorted(CARD_BILLIONS) == REGISTRY


@pytest.mark.parametrize("entry", REGISTRY)
def test_registry_numbers_give_the_model_cards_parameter_count(entry):
    """The architecture numbers each registry entry carries (from the published config.json) give
    the parameter count its model card states: a typo in a number would not."""
    arch = load_config(compose_tree([ANY_MODEL, f"model={entry}"])).model.architecture
    total, _ = memory.parameter_counts(arch)
    stated = CARD_BILLIONS[entry]
    decimals = len(repr(stated).partition(".")[2])
    unit = 10**-decimals  # cards round (1.7B for 1.72B) or cut (1.23B for 1.2358B)
    assert stated - unit / 2 <= total / 1e9 < stated + unit, (total, stated)


@pytest.mark.parametrize("entry", REGISTRY)
def test_a_plan_estimates_every_registry_model_with_no_hub(entry, tmp_path, monkeypatch):
    from posttrain import hub
    from posttrain.plan import plan_lines

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    hub.reachable.cache_clear()
    cfg = load_config(
        compose_tree([ANY_MODEL, f"model={entry}", "deepspeed=zero3", "launcher=deepspeed", "launcher.gpus=8"])
    )
    memory_line = next(line for line in plan_lines(cfg) if line.startswith("memory:"))
    total = memory.parameter_counts(cfg.model.architecture)[0]
    assert memory_line.startswith(f"memory: {memory.count(total)} parameters; model states per GPU "), memory_line


def test_a_family_the_formula_does_not_know_is_counted_by_building_it(tmp_path):
    """GPT-2's config.json has none of the Llama-style numbers: transformers builds it on the meta
    device, as for any model type outside memory.FORMULA_TYPES."""
    from transformers import GPT2Config

    from posttrain.plan import plan_lines

    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000).save_pretrained(tmp_path / "gpt2")
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000))
    total = sum(p.numel() for p in built.parameters())
    cfg = load_config(compose_tree([ANY_MODEL, f"model.path={tmp_path / 'gpt2'}"]))
    assert memory.model_parameter_counts(cfg.model)[0] == total
    assert any(line.startswith(f"memory: {memory.count(total)} parameters") for line in plan_lines(cfg))


# --- model states per process ---------------------------------------------------------------

N, ADAPTERS, LARGE = 118_800_000, 2_200_000, 7_000_000_000


def ds(stage, offload_optimizer=False, offload_param=False):
    from posttrain.config import DeepSpeedConfig

    return DeepSpeedConfig(stage=stage, offload_optimizer=offload_optimizer, offload_param=offload_param)


def full(total, weight_bytes):
    return memory.Holding(total, 0, weight_bytes, 0.0, "full")


def lora(base, adapters, weight_bytes, frozen_bytes):
    return memory.Holding(adapters, base, weight_bytes, frozen_bytes, "lora")


def test_16_bit_zero2_states_are_deepspeeds_own_estimate():
    """With bf16 weights (b = 2) the ZeRO-2 formula is DeepSpeed's: 2 N + 18 N / w."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for gpus, nodes in ((2, 1), (8, 4)):
        _, gpu = estimate_zero2_model_states_mem_needs(LARGE, gpus, nodes, cpu_offload=False)
        assert memory.model_states(ds(2), full(LARGE, 2), gpus, nodes)[0] == pytest.approx(gpu)


def test_fp32_states_per_process_without_and_with_zero():
    """CPU workers train fp32 (b = 4): 16 bytes per parameter alone, 20 under DDP (its gradient
    buckets), 4 + 20 / w under ZeRO-1/2, and under ZeRO-3 a model under 1e9 parameters gathered
    whole plus (4 + 4 + 16) / w."""
    assert memory.model_states(ds(None), full(N, 4), 1, 1) == (16 * N, 0.0)
    assert memory.model_states(ds(None), full(N, 4), 2, 1) == (20 * N, 0.0)
    assert memory.model_states(ds(None), full(N, 2), 2, 1) == (10 * N, 0.0)  # model.dtype=bfloat16
    for stage in (1, 2):
        assert memory.model_states(ds(stage), full(N, 4), 2, 1) == (4 * N + 20 * N / 2, 0.0)
    assert memory.model_states(ds(3), full(N, 4), 2, 1) == (4 * N + 24 * N / 2, 0.0)


def test_zero3_gathers_at_most_deepspeeds_live_parameters():
    gathered = 2 * memory.ZERO3_MAX_LIVE
    assert memory.model_states(ds(3), full(LARGE, 2), 8, 4)[0] == gathered + 20 * LARGE / 32


def test_offload_moves_the_optimizer_and_the_parameters_to_cpu():
    buffer = memory.OFFLOAD_BUFFER
    # ZeRO-2: fp32 gradients, copy and Adam (16), and a copy of the weights' partition (4)
    assert memory.model_states(ds(2, True), full(N, 4), 2, 1) == (4 * N, 2 * buffer * 20 * N / 2)
    # ZeRO-3: the 16; with parameter offload each rank's weights too; the gathered weights stay
    assert memory.model_states(ds(3, True), full(N, 4), 2, 1) == (4 * N + 4 * N / 2, 2 * buffer * 16 * N / 2)
    assert memory.model_states(ds(3, True, True), full(N, 4), 2, 1) == (4 * N, 2 * buffer * 20 * N / 2)


def test_lora_base_is_replicated_under_zero1_and_2_and_partitioned_under_zero3():
    """Only the adapters have gradients and Adam moments; the frozen base is held whole by every
    process under DDP and ZeRO-1/2, and partitioned (base bytes / world) under ZeRO-3."""
    base, adapter_states = 2 * LARGE, (2 + 16) * ADAPTERS / 8  # bf16 base; adapter grads, copy, Adam
    hold = lora(LARGE, ADAPTERS, 2, 2)
    for stage in (1, 2):
        assert memory.model_states(ds(stage), hold, 8, 1)[0] == base + 2 * ADAPTERS + adapter_states
    gathered = 2 * memory.ZERO3_MAX_LIVE + 2 * ADAPTERS
    assert memory.model_states(ds(3), hold, 8, 1)[0] == gathered + (base + 2 * ADAPTERS) / 8 + adapter_states
    # no DeepSpeed: the fp32 adapters' weights, gradients and Adam (16 bytes) and DDP's buckets (4)
    assert memory.model_states(ds(None), lora(LARGE, ADAPTERS, 4, 2), 8, 1)[0] == base + 20 * ADAPTERS


def test_lora_parameters_equal_what_peft_adds():
    from peft import LoraConfig, get_peft_model

    config = FAMILY_SHAPES["qwen2"]
    model = AutoModelForCausalLM.from_config(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert memory.lora_parameters(ArchitectureConfig.from_json(config.to_dict()), 8, targets) == trainable


def test_plan_estimates_gpus_and_this_machines_cpu_workers(tmp_path, monkeypatch):
    """On a machine without a GPU, `auto` trains fp32: the plan gives the bf16 GPU figure and the
    CPU workers' one."""
    from posttrain import plan
    from posttrain.plan import model_state_estimate, plan_lines

    monkeypatch.setattr(plan, "gpu_devices_present", lambda: False)
    monkeypatch.setattr(memory, "gpu_devices_present", lambda: False)
    source = config_folder(tmp_path, "model", QWEN_05B)
    cfg = load_config(
        compose_tree([ANY_MODEL, f"model.path={source}", "deepspeed=zero2", "launcher=deepspeed", "launcher.gpus=2"])
    )
    total = memory.parameter_counts(ArchitectureConfig.from_json(QWEN_05B.to_dict()))[0]
    assert model_state_estimate(cfg, on_gpu=True).per_gpu == 2 * total + 18 * total / 2
    assert model_state_estimate(cfg, on_gpu=False).per_gpu == 4 * total + 20 * total / 2
    line = next(line for line in plan_lines(cfg) if line.startswith("memory:"))
    assert f"per GPU {memory.gib(11 * total)} (ZeRO-2: bf16 weights" in line
    assert f"on this machine's CPU workers {memory.gib(14 * total)} each (ZeRO-2: fp32 weights" in line
