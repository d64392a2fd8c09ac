"""Distributed settings from one composed config: DeepSpeed's json, the batch arithmetic, the
launcher command lines for a 4-node x 8-GPU job, the Slurm template, and the plan of a 7B
recipe under ZeRO-3. No worker starts here (tests/integration/test_distributed.py runs them)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from posttrain.cli import compose_tree
from posttrain.config import ConfigError
from posttrain.deepspeed_config import deepspeed_json
from posttrain.launch import launch_command, write_launch_files
from posttrain.memory import memory_per_gpu, model_config, parameter_counts
from posttrain.plan import load_config
from tests.conftest import REPO, run_posttrain

HOSTFILE = REPO / "launch" / "hostfile.example"


def config(*overrides: str, tmp_path: Path | None = None):
    run = [f"run.output_dir={tmp_path / 'run'}"] if tmp_path else []
    return load_config(compose_tree([*run, *overrides]))


# --- DeepSpeed's json --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "stage", "offload_optimizer", "offload_param"),
    [
        ("zero1", 1, False, False),
        ("zero2", 2, False, False),
        ("zero3", 3, False, False),
        ("zero2_offload", 2, True, False),
        ("zero3_offload", 3, True, True),
    ],
)
def test_each_deepspeed_option_becomes_a_json_that_agrees_with_the_training_arguments(
    option, stage, offload_optimizer, offload_param
):
    cfg = config(f"deepspeed={option}", "sft.per_device_train_batch_size=4", "sft.gradient_accumulation_steps=3")
    sft = cfg.stages["sft"]
    ds = deepspeed_json(cfg.deepspeed, sft, world=16, precision="bf16", hidden_size=128)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 16
    assert ds["gradient_clipping"] == sft.max_grad_norm
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload_optimizer
    assert ("offload_param" in zero) == offload_param
    assert zero["reduce_bucket_size"] == 128 * 128
    # DeepSpeed's own CPU Adam with offload, at the stage's learning rate; else the trainer's AdamW
    assert ("optimizer" in ds) == offload_optimizer
    if offload_optimizer:
        assert ds["optimizer"]["params"]["lr"] == sft.learning_rate
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "auto" not in str(ds), "every value written out when the hidden size is known"


def test_extra_deepspeed_keys_merge_over_what_posttrain_writes():
    cfg = config("deepspeed=zero2", "+deepspeed.extra.zero_optimization.allgather_bucket_size=5")
    ds = deepspeed_json(cfg.deepspeed, cfg.stages["sft"], world=2, precision="fp32")
    assert ds["zero_optimization"]["allgather_bucket_size"] == 5
    assert ds["zero_optimization"]["stage"] == 2  # the rest of the section stays


def test_global_batch_size_sets_the_accumulation_for_the_planned_world():
    cfg = config(
        "launcher=torchrun", "launcher.gpus=8", "launcher.nnodes=4", "launcher.master_addr=node-0",
        "sft.per_device_train_batch_size=4", "sft.global_batch_size=256",
    )  # fmt: skip
    assert cfg.stages["sft"].gradient_accumulation_steps == 256 // (4 * 32)


def test_a_global_batch_is_keyed_by_the_accumulation_it_gives():
    from posttrain.stage_cache import stage_keys

    via_global = stage_keys(config("sft.per_device_train_batch_size=32", "sft.global_batch_size=64"))
    via_accumulation = stage_keys(config("sft.per_device_train_batch_size=32", "sft.gradient_accumulation_steps=2"))
    assert via_global == via_accumulation != stage_keys(config("sft.per_device_train_batch_size=32"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launcher=torchrun", "launcher.gpus=8", "sft.per_device_train_batch_size=4", "sft.global_batch_size=100"],
            "sft.global_batch_size: 100 is not divisible by per_device_train_batch_size 4 x 8 processes = 32; "
            "choose a multiple of 32 or change sft.per_device_train_batch_size",
        ),
        (
            ["deepspeed=zero3", "peft=lora"],
            "peft.method: lora under deepspeed.stage=3 is not supported: ZeRO-3 partitions the base weights that "
            "4-bit loading and the LoRA merge need; use deepspeed=zero2 (or zero2_offload) for LoRA stages",
        ),
        (
            ["deepspeed=zero3", "+align.peft=lora"],
            "align.peft: lora under deepspeed.stage=3 is not supported",
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
            ["launcher=deepspeed", "launcher.srun=true"],
            "launcher.srun: srun starts torchrun or accelerate on every node; deepspeed reaches the nodes itself",
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


def test_a_hostfile_line_that_is_not_host_slots_names_its_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode-0 slots=8\nnode-1 gpus=8\n")
    with pytest.raises(ConfigError, match=r"hostfile line 3: 'node-1 gpus=8' is not `host slots=N`"):
        config("launcher=deepspeed", f"launcher.hostfile={hostfile}", "launcher.nnodes=2")


# --- command lines for 4 nodes x 8 GPUs ----------------------------------------------------


def _bash_ok(command: list[str], tmp_path: Path) -> None:
    script = tmp_path / "command.sh"
    script.write_text(shlex.join(command) + "\n")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_deepspeed_command_for_four_nodes_of_eight_gpus(tmp_path):
    cfg = config(
        "deepspeed=zero3", "launcher=deepspeed", "launcher.gpus=8", "launcher.nnodes=4",
        f"launcher.hostfile={HOSTFILE}", tmp_path=tmp_path,
    )  # fmt: skip
    resolved = tmp_path / "run" / "resolved.yaml"
    command = launch_command(cfg, resolved)
    assert command == [
        "deepspeed", f"--hostfile={HOSTFILE}", "--num_nodes=4", "--num_gpus=8", "--master_port=29500",
        "--no_local_rank", "--module", "posttrain.worker", str(resolved),
    ]  # fmt: skip
    _bash_ok(command, tmp_path)


def test_torchrun_commands_for_four_nodes_of_eight_gpus(tmp_path):
    common = ["launcher=torchrun", "launcher.gpus=8", "launcher.nnodes=4", "launcher.master_addr=node-0"]
    resolved = tmp_path / "run" / "resolved.yaml"
    elastic = launch_command(config(*common, "launcher.rdzv_id=job-7", tmp_path=tmp_path), resolved)
    assert elastic == [
        "torchrun", "--nproc-per-node=8", "--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node-0:29500",
        "--rdzv-id=job-7", "--module", "posttrain.worker", str(resolved),
    ]  # fmt: skip
    static = launch_command(config(*common, "launcher.node_rank=2", tmp_path=tmp_path), resolved)
    assert static[3:6] == ["--node-rank=2", "--master-addr=node-0", "--master-port=29500"]
    under_slurm = launch_command(config(*common, "launcher.srun=true", tmp_path=tmp_path), resolved)
    assert under_slurm[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # the rendezvous id defaults to the run's name (the default recipe's)
    assert under_slurm[under_slurm.index("torchrun") :] == [*elastic[:5], "--rdzv-id=tiny_sft_dpo", *elastic[6:]]
    for command in (elastic, static, under_slurm):
        _bash_ok(command, tmp_path)


def test_accelerate_gets_a_config_file_with_posttrains_deepspeed_json(tmp_path):
    cfg = config(
        "deepspeed=zero2", "launcher=accelerate", "launcher.gpus=8", "launcher.nnodes=4",
        "launcher.master_addr=node-0", "launcher.node_rank=1", tmp_path=tmp_path,
    )  # fmt: skip
    resolved = tmp_path / "run" / "resolved.yaml"
    command = write_launch_files(cfg, resolved)
    folder = resolved.parent / "launch"
    assert command[:4] == ["accelerate", "launch", f"--config_file={folder / 'accelerate.yaml'}", "--machine_rank=1"]
    accelerate = yaml.safe_load((folder / "accelerate.yaml").read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED"
    assert (accelerate["num_machines"], accelerate["num_processes"], accelerate["main_process_ip"]) == (4, 32, "node-0")
    ds = yaml.safe_load(Path(accelerate["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["train_batch_size"] == cfg.stages["sft"].per_device_train_batch_size * 32
    assert subprocess.run(["bash", "-n", str(folder / "workers.sh")]).returncode == 0


def test_under_srun_each_node_puts_in_its_own_rank_and_ignores_sigusr1(tmp_path):
    cfg = config(
        "launcher=accelerate", "launcher.gpus=8", "launcher.nnodes=4", "launcher.master_addr=node-0",
        "launcher.srun=true", tmp_path=tmp_path,
    )  # fmt: skip
    command = launch_command(cfg, tmp_path / "run" / "resolved.yaml")
    wrapper = command[command.index("bash") : command.index("accelerate")]
    assert "--machine_rank=@NODE_RANK@" in command
    # what srun runs on node 3: the wrapper, here around `echo` and a `kill -USR1` of itself
    node = subprocess.run(
        [*wrapper, "bash", "-c", 'kill -USR1 $$; echo "$@"', "_", *command[command.index("accelerate") :]],
        env={**os.environ, "SLURM_NODEID": "3"}, capture_output=True, text=True,
    )  # fmt: skip
    assert node.returncode == 0, "SIGUSR1 is ignored"
    assert "--machine_rank=3" in node.stdout.split()


def _cluster_tools(bin_dir: Path) -> None:
    """scontrol names four hosts; srun records the command it was given and succeeds."""
    bin_dir.mkdir()
    tools = {
        "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-01\\ngpu-02\\ngpu-03\\ngpu-04\\n"; '
        'else echo "scontrol $*" >> "$CALLS"; fi',
        "srun": 'printf "%s\\n" "$@" > "$SRUN_ARGS"',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


def test_the_multinode_slurm_template_starts_one_torchrun_per_node_on_one_frozen_config(tmp_path, cache_dir):
    """The real script and the real posttrain head, with Slurm's scontrol and srun stood in for."""
    script = REPO / "launch" / "slurm_multinode.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert script.read_text().splitlines()[1].startswith("# sbatch --nodes=4 launch/slurm_multinode.sbatch ")
    _cluster_tools(tmp_path / "bin")
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls.txt"),
        "SRUN_ARGS": str(tmp_path / "srun_args.txt"),
        "POSTTRAIN_CACHE": str(cache_dir),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "gpu-[01-04]",
        "SLURM_GPUS_ON_NODE": "8",
        "RUN_DIR": str(run_dir),
    }
    proc = subprocess.run(
        ["bash", str(script), "deepspeed=zero3"], env=env, capture_output=True, text=True, timeout=300
    )
    # the stand-in srun trains nothing, so the head finds no summary: it exits 0 with nothing to show
    assert proc.returncode == 0, proc.stderr[-3000:]
    srun = (tmp_path / "srun_args.txt").read_text().splitlines()
    resolved = run_dir / "resolved.yaml"
    torchrun = srun[srun.index("torchrun") :]
    assert srun[:3] == ["--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert torchrun == [
        "torchrun", "--nproc-per-node=8", "--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-01:29500",
        "--rdzv-id=4242", "--module", "posttrain.worker", str(resolved),
    ]  # fmt: skip
    frozen = yaml.safe_load(resolved.read_text())
    assert (frozen["launcher"]["nnodes"], frozen["launcher"]["gpus"], frozen["deepspeed"]["stage"]) == (4, 8, 3)
    assert frozen["run"]["output_dir"] == str(run_dir) and Path(frozen["run"]["cache_dir"]).is_absolute()
    assert "launch: torchrun (srun on every node), 4 node(s) x 8 process(es) = 32" in proc.stdout
    assert not (tmp_path / "calls.txt").exists(), "no requeue after a run that was not preempted"


# --- the plan of a 7B recipe ---------------------------------------------------------------


def test_plan_of_a_7b_recipe_under_zero3_shows_batches_and_deepspeeds_memory_estimate(tmp_path, cache_dir):
    """A Llama-2-7B-shaped config.json (no weights): DeepSpeed's estimate for 4 nodes x 8 GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
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
    total, largest = parameter_counts(model_config(load_config(compose_tree([f"model.path={model}"])).model))
    assert total == 6_738_415_616 and largest == 32000 * 4096
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=8, num_nodes=4, cpu_offload=False, cpu_offload_params=False
    )
    cfg = config("deepspeed=zero3")
    assert memory_per_gpu(cfg.deepspeed, total, largest, 8, 4)[0] == gpu
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
        (["peft=lora", "model.dtype=bfloat16"], 2, "bfloat16 frozen weights"),
        (["peft=lora", "model.dtype=float32"], 4, "float32 frozen weights"),
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
    total, _ = parameter_counts(model_config(cfg.model))
    assert total == 8_030_261_248
    memory = [line for line in plan_lines(cfg) if line.startswith("memory:")][0]
    gib = bytes_each * total / 2**30
    assert memory == (
        f"memory: 8.03B parameters; model states per GPU {gib:.1f} GiB "
        f"({bytes_each} bytes per parameter: {what}; activations come on top)"
    )
