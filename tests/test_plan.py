"""Can this run go (posttrain/plan.py): stage chains as the user writes them (valid orders load,
invalid ones are one-line plan-time errors, an iterative sft -> dpo -> dpo runs with the second
DPO's reference pinned to SFT), mistakes that would only crash on a cluster, and the plan's batch
and memory lines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from posttrain.cli import compose_tree
from posttrain.config import ConfigError
from posttrain.memory import ZERO3_MAX_LIVE, architecture, lora_parameters, parameter_counts
from posttrain.pipeline import run_pipeline
from posttrain.plan import load_config
from tests.conftest import ANY_MODEL, FAST, REPO, run_posttrain

HOSTFILE = REPO / "launch" / "hostfile.example"


def config(*overrides: str, tmp_path: Path | None = None):
    run = [f"run.output_dir={tmp_path / 'run'}"] if tmp_path else []
    return load_config(compose_tree([ANY_MODEL, *run, *overrides]))


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SECOND_DPO = ["+align@align2=dpo", "run.stages=[sft,align,align2]", "align2.init_from=align"]


def load(*overrides: str):
    return load_config(compose_tree(list(overrides)))


@pytest.mark.parametrize(
    "overrides, chain",
    [
        ([], ["sft:sft", "align:dpo"]),
        (["align=orpo"], ["sft:sft", "align:orpo"]),
        (["sft=none", "align=orpo", "align.init_from=base"], ["align:orpo"]),
        (["align=kto"], ["sft:sft", "align:kto"]),
        (["align=rm"], ["sft:sft", "align:rm"]),
        (["align=simpo"], ["sft:sft", "align:simpo"]),
        (["align=cpo"], ["sft:sft", "align:cpo"]),
        (["align=ipo"], ["sft:sft", "align:dpo"]),
        (SECOND_DPO, ["sft:sft", "align:dpo", "align2:dpo"]),
    ],
)
def test_chains_users_write_load(overrides, chain):
    cfg = load(*overrides)
    assert [f"{name}:{stage.method}" for name, stage in cfg.stages.items()] == chain


def test_a_chain_of_sft_alone_runs_it_and_ranks_sweeps_by_it():
    """run.stages=[sft] alone: the align section left out is not checked, and sweep.objective
    (align.exact_match) moves to the last stage that runs, with a note in the plan."""
    for overrides in (["run.stages=[sft]"], ["align=none"], ["run.stages=[sft]", "align.init_from=nowhere"]):
        cfg = load(*overrides)
        assert list(cfg.stages) == ["sft"] and cfg.sweep.objective == "sft.exact_match"
        assert cfg.notes == ["sweep.objective: align does not run; runs are ranked by sft.exact_match"]
    kept = load("run.stages=[sft]", "sweep.objective=base.exact_match")
    assert kept.sweep.objective == "base.exact_match" and kept.notes == []
    assert load("sweep.objective=sft.response_loss").sweep.objective == "sft.response_loss"


def test_ipo_is_dpo_with_the_ipo_loss():
    assert load("align=ipo").stages["align"].loss_type == ["ipo"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["align=orpo", "align.reference=base"],
            "align.reference: orpo is reference-free and takes no reference; remove align.reference "
            "(methods with one: dpo, kto)",
        ),
        (["align.reference=later"], "align.reference: 'later' is not a causal LM before 'align'; allowed: base, sft"),
        (
            ["align=rm", *SECOND_DPO[:2], "align2.init_from=previous"],
            "align2.init_from: 'previous' is the reward model 'align', which does not generate; "
            "start dpo from one of: base, sft",
        ),
        (
            ["data.preference.format=messages"],
            "align.data.format: 'messages' rows do not fit dpo (preference data); allowed: preference, hh",
        ),
        (
            ["data.preference.path=builtin:sft"],
            "align.data.path: builtin:sft is sft data and does not fit dpo (preference data); use builtin:preference",
        ),
        (
            ["data.sft.path=builtin:preference"],
            "sft.data.path: builtin:preference is preference data and does not fit sft (sft data); use builtin:sft",
        ),
        (["align.peft=adapter"], "align.peft: 'adapter' is not one of null, none, lora, qlora"),
        (["peft.handoff=copy"], "peft.handoff: 'copy' is not one of merge, stack"),
        (["align=kto", "align.per_device_train_batch_size=1"], "align.per_device_train_batch_size: KTO needs >= 2"),
        (
            ["align=simpo", "align.loss_type=sigmoid"],
            "align.loss_type: simpo's loss is simpo; for others use method cpo",
        ),
        # a section left out of run.stages is not checked, but a key or objective that is no stage still is
        (["run.stages=[sft]", "+algn.beta=0.1"], "algn: unknown key; did you mean align?"),
        (["run.stages=[sft]", "+sfft.learning_rate=1"], "sfft: unknown key; did you mean sft?"),
        (
            ["run.stages=[sft]", "sweep.objective=dpo.exact_match"],
            "sweep.objective: 'dpo' is not a stage; allowed: base, sft, align",
        ),
    ],
)
def test_invalid_chains_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load(*overrides)
    assert str(e.value) == message


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available(), reason="QLoRA can run here"
)
@pytest.mark.parametrize("overrides", [["peft=lora", "peft.method=qlora"], ["align.peft=qlora"]])
def test_qlora_without_a_gpu_is_a_plan_time_error(overrides):
    with pytest.raises(ConfigError) as e:
        load(*overrides)
    key = "align.peft" if overrides[0].startswith("align") else "peft.method"
    assert str(e.value).startswith(f"{key}: qlora needs ")
    assert "on this machine use lora" in str(e.value)


def test_iterative_dpo_with_its_reference_pinned_to_sft(tmp_path, cache_dir, capfd):
    """sft -> dpo -> dpo where the second DPO starts from the first and compares with SFT: it loads
    the SFT model as its reference and reuses the SFT log-probs the first DPO computed (both read
    the same 96 rows: align's 6 steps x 16, align2's 4 x 24)."""
    out = tmp_path / "run"
    second = ["align2.reference=sft", "align2.max_steps=4", "align2.per_device_train_batch_size=24"]
    second += ["align2.learning_rate=3e-4", "align2.max_length=128"]
    overrides = [*FAST, *SECOND_DPO, *second, f"run.output_dir={out}", f"run.cache_dir={cache_dir}"]
    cfg = load_config(compose_tree(overrides))
    assert run_pipeline(cfg)["status"] == "complete"
    manifests = {s: json.loads((out / s / "manifest.json").read_text()) for s in ("sft", "align", "align2")}
    assert manifests["align2"]["parent"]["key"] == manifests["align"]["key"]
    assert manifests["align2"]["status"] == "complete"
    logged = capfd.readouterr().out
    assert f"reference log-probs of the train rows reused from {(out / 'sft').resolve() / 'ref_logps'}" in logged


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launcher=torchrun", "launcher.gpus=8", "sft.per_device_train_batch_size=4", "sft.global_batch_size=100"],
            "sft.global_batch_size: 100 is not divisible by per_device_train_batch_size 4 x 8 processes = 32; "
            "choose a multiple of 32 or change sft.per_device_train_batch_size",
        ),
        (
            ["launcher=deepspeed", "launcher.hostfile=/no/such/hostfile"],
            "launcher.hostfile: /no/such/hostfile does not exist",
        ),
        (
            ["launcher=deepspeed", "launcher.nnodes=4"],
            "launcher.hostfile: the deepspeed launcher on 4 nodes needs a hostfile (see launch/hostfile.example)",
        ),
        (
            ["launcher=deepspeed", f"launcher.hostfile={HOSTFILE}", "launcher.nnodes=5"],
            f"launcher.nnodes: 5 nodes but the hostfile {HOSTFILE} names 4",
        ),
        (
            ["launcher=deepspeed", f"launcher.hostfile={HOSTFILE}", "launcher.nnodes=4", "launcher.gpus=16"],
            f"launcher.gpus: 16 processes per node but node-0, node-1, node-2, node-3 has fewer slots in {HOSTFILE}",
        ),
        (
            ["launcher=torchrun", "launcher.nnodes=4", "launcher.gpus=8"],
            "launcher.master_addr: torchrun on 4 nodes needs the rank-0 node's address (every node must reach it)",
        ),
        (["launcher.gpus=2"], "launcher.gpus: launcher=local runs one process; use torchrun or deepspeed"),
        (
            ["launcher.srun=true"],
            "launcher.srun: srun starts torchrun, deepspeed or accelerate on every node; local runs one process",
        ),
        (["launcher.name=mpirun"], "launcher.name: 'mpirun' is not one of local, torchrun, deepspeed, accelerate"),
        (["deepspeed.stage=4"], "deepspeed.stage: 4 is not one of null, 0, 1, 2, 3"),
        (["deepspeed=zero2", "deepspeed.offload_param=true"], "deepspeed.offload_param: needs ZeRO stage 3"),
    ],
)
def test_mistakes_that_would_crash_on_the_cluster_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        config(*overrides)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_workers_on_other_nodes_read_the_frozen_config_without_the_launch_nodes_files(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=8\nnode-1 slots=8\n")
    tree = compose_tree(["launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.nnodes=2", "launcher.gpus=8"])
    hostfile.unlink()  # as on a node that has no copy of it
    with pytest.raises(ConfigError, match="launcher.hostfile: .* does not exist"):
        load_config(tree)
    assert load_config(tree, on_launch_node=False).launcher.nnodes == 2


def test_plan_of_a_7b_recipe_under_zero3_shows_batches_and_the_memory_estimate(tmp_path, cache_dir):
    """A Llama-2-7B-shaped config.json (no weights), 4 nodes x 8 GPUs: per GPU, 1e9 gathered bf16
    weights (DeepSpeed's live-parameter limit) and a 32nd of bf16 weights, gradients and ZeRO's 16."""
    from transformers import LlamaConfig

    model = tmp_path / "llama-7b"
    LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ).save_pretrained(model)
    proc = run_posttrain(
        "plan=true", "recipe=zephyr_sft_dpo", f"model.path={model}", "deepspeed=zero3", "launcher=deepspeed",
        "launcher.gpus=8", "launcher.nnodes=4", f"launcher.hostfile={HOSTFILE}", f"run.output_dir={tmp_path / 'run'}",
        cache_dir=cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, largest = parameter_counts(architecture(load_config(compose_tree([ANY_MODEL, f"model.path={model}"])).model))
    assert total == 6_738_415_616 and largest == 32000 * 4096
    gpu = 2 * ZERO3_MAX_LIVE + (2 + 2 + 16) * total / 32
    out = proc.stdout
    assert "launch: deepspeed, 4 node(s) x 8 process(es) = 32" in out
    assert "deepspeed: ZeRO-3" in out
    assert f"memory: 6.74B parameters; model states per GPU {gpu / 2**30:.1f} GiB" in out
    assert "batch 16 x 1 accumulation x 32 processes = 512 per step" in out  # sft
    assert "batch 8 x 2 accumulation x 32 processes = 512 per step" in out  # dpo
    assert not (tmp_path / "run" / "resolved.yaml").exists(), "a plan starts nothing"


@pytest.mark.parametrize(
    "overrides, bytes_each, what",
    [
        ([], 16, "fp32 weights, gradients, Adam"),  # fp32 master weights: what model.dtype=auto trains
        (["model.dtype=bfloat16"], 8, "bf16 weights, gradients, Adam"),
        (["model.dtype=float16"], 16, "fp32 weights, gradients, Adam"),  # fp16 mixed precision
        # the frozen base, and the adapters' fp32 weights, gradients and Adam (16 bytes each)
        (["peft=lora", "model.dtype=bfloat16"], 2, "bf16 frozen weights, LoRA adapters and Adam"),
        (["peft=lora", "model.dtype=float32"], 4, "fp32 frozen weights, LoRA adapters and Adam"),
        (["peft=lora", "sft.peft=none"], 16, "fp32 weights, gradients, Adam"),  # the heaviest stage decides
    ],
)
def test_plan_of_one_process_estimates_the_whole_models_memory(tmp_path, overrides, bytes_each, what):
    """An 8B model on one GPU: what the weights, gradients and optimizer take per parameter, so a
    full fine-tune that cannot fit is seen before anything loads."""
    from transformers import LlamaConfig

    from posttrain.plan import plan_lines

    model = tmp_path / "llama-8b"
    LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8,
    ).save_pretrained(model)  # fmt: skip
    cfg = config(f"model.path={model}", *overrides, tmp_path=tmp_path)
    total, _ = parameter_counts(architecture(cfg.model))
    assert total == 8_030_261_248
    if "peft=lora" in overrides and "sft.peft=none" not in overrides:  # r 16 on every projection: 41.9M
        bytes_each += 16 * lora_parameters(cfg.model.architecture or architecture(cfg.model), 16, TARGETS) / total
    memory = [line for line in plan_lines(cfg) if line.startswith("memory:")][0]
    gib = bytes_each * total / 2**30
    assert memory == (
        f"memory: 8.03B parameters; model states per GPU {gib:.1f} GiB "
        f"({bytes_each:.2g} bytes per parameter: {what}; activations come on top)"
    )
