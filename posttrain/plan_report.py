"""What `posttrain plan=true` prints: the launch, DeepSpeed and memory lines, then one line per stage
with its batch arithmetic, where its settings came from, and whether it will be trained, resumed
or reused. `posttrain.plan` checks the config; this module only describes it.

    print(plan_text(cfg, stage_keys(cfg)))      # cfg = posttrain.plan.load_config(tree)
"""

from __future__ import annotations

from posttrain import memory
from posttrain.config import (
    LIKELIHOOD_SCORERS,
    ArchitectureConfig,
    Config,
    DataSource,
    global_batch,
    gpu_devices_present,
    planned_world_size,
    processes_per_node,
    stage_peft,
)
from posttrain.rewards import reward_specs
from posttrain.stage_cache import StageIndex, place_stage
from posttrain.stages import STAGES, max_steps_rows


def describe_data(data: DataSource) -> str:
    """`path [split]` of each source, with its weight or row count in a mixture, and the rule of
    curation by score."""
    parts = []
    for src in data.source_list():
        share = f" x{src.weight:g}" if src.weight is not None else f" {src.rows} rows" if src.rows else ""
        parts.append(f"{src.path} [{src.split}]{share}")
    described = " + ".join(parts)
    score = data.score
    if score.by is not None:
        rule = [f"{n} {v:g}" for n, v in (("keep", score.keep), ("min_score", score.min_score)) if v is not None]
        balance = f", balanced by {score.balance}" if score.balance != "none" else ""
        balance += f", {score.length_bins} length bins" if score.length_bins > 1 else ""
        balance += f", drawn from the best {score.sample_from:g}" if score.sample_from is not None else ""
        under = f" under {score.model}" if score.by in LIKELIHOOD_SCORERS else ""
        described += f" (scored by {score.by}{under}: {', '.join(rule)}{balance})"
    return described


def plan_text(cfg: Config, keys: dict[str, str], notes: list[str] | tuple[str, ...] = ()) -> str:
    """The stage chain as it will run, one line per stage, and which stages are reused or resumed;
    `notes` (from check_references) under the run folder."""
    lines = [f"model: {cfg.model.path}", f"run folder: {cfg.run.output_path}"]
    lines += [f"note: {n}" for n in [*cfg.notes, *notes]]
    lines += [*plan_lines(cfg), "stages:"]
    world = planned_world_size(cfg.launcher)
    index = StageIndex(cfg.run.cache_path)
    previous = "base"
    # the stage whose model each stage hands on (a data stage hands on its parent's)
    model_of = {"base": "base"}
    for name, stage in cfg.stages.items():
        spec = STAGES[stage.method]
        parent = model_of[previous if stage.init_from == "previous" else stage.init_from]
        model_of[name] = parent if spec.model_kind == "none" else name
        micro, accum = stage.per_device_train_batch_size, stage.gradient_accumulation_steps
        length = f"{stage.max_steps} steps" if stage.max_steps > 0 else f"{stage.num_train_epochs:g} epochs"
        came = cfg.origins.get(name, {})
        lr_origin = f" ({came['learning_rate']})" if came else ""
        about = [came["max_steps" if stage.max_steps > 0 else "num_train_epochs"]] if came else []
        if (rows := max_steps_rows(stage, world)) is not None:
            about.append(f"keeps the {rows} train rows they read")
        length += f" ({'; '.join(about)})" if about else ""
        reference = f", reference {model_of[stage.reference or parent]}" if spec.uses_reference else ""
        peft = stage_peft(stage, cfg.peft)
        adapters = f", {peft} ({cfg.peft.handoff})" if peft != "none" else ""
        reward = f", reward {describe_reward(stage)}" if spec.uses_reward else ""
        if spec.make_data is not None:
            lines.append(
                f"  {name}: {stage.method} sampled from {parent}, {stage.num_samples} replies per prompt "
                f"(temperature {stage.temperature:g}, up to {stage.max_new_tokens} tokens){reward}, "
                f"prompts {describe_data(stage.data)}"
            )
        else:
            lines.append(
                f"  {name}: {stage.method} from {parent}{reference}{adapters}{reward}, "
                f"data {describe_data(stage.data)}, lr {stage.learning_rate:g}{lr_origin}, "
                f"batch {micro} x {accum} accumulation x {world} processes = {global_batch(stage, world)} per step, "
                f"{length}"
            )
            if name in cfg.auto_batches:
                lines.append(f"    micro-batch auto: {cfg.auto_batches[name]}")
            if stage.padding_free and cfg.model.attn_implementation not in ("flash_attention_2", "flash_attention_3"):
                lines.append(
                    f"    padding-free under {cfg.model.attn_implementation}: one block-diagonal mask over the whole "
                    "packed row (attention quadratic in its length); flash_attention_2 runs it variable-length"
                )
            if stage.activation_checkpointing == "auto" and memory.gpu_memory() is not None:
                on, why = memory.activation_checkpointing(stage, cfg, spec.data_kind, local_only=world == 1)
                lines.append(f"    activation checkpointing: {'on' if on else 'off'} ({why})")
        placement = place_stage(name, keys[name], cfg, index)
        where = {
            "reuse": f"reuse complete {placement.folder}",
            "resume": f"resume {placement.checkpoint}",
            "train": "train",
        }[placement.action]
        lines.append(f"    key {keys[name]}: {where}")
        previous = name
    return "\n".join(lines)


def plan_lines(cfg: Config) -> list[str]:
    """The launch, DeepSpeed and memory lines of `posttrain plan=true`."""
    launcher, ds = cfg.launcher, cfg.deepspeed
    world = planned_world_size(launcher)
    per_node = processes_per_node(launcher)
    how = " (srun on every node)" if launcher.srun else ""
    lines = [f"launch: {launcher.name}{how}, {launcher.nnodes} node(s) x {per_node} process(es) = {world}"]
    if ds.stage is None:
        lines.append("deepspeed: none" + (" (DDP: every process holds the whole model)" if world > 1 else ""))
    else:
        offload = [name for name, on in (("optimizer", ds.offload_optimizer), ("parameters", ds.offload_param)) if on]
        lines.append(f"deepspeed: ZeRO-{ds.stage}" + (f", {' and '.join(offload)} offloaded to CPU" if offload else ""))
    return lines + memory_lines(cfg, world, per_node)


def describe_reward(stage) -> str:
    """An online stage's reward sources, with their weights when there are several."""
    sources = reward_specs(stage.reward)
    if len(sources) == 1:
        return sources[0]
    weights = stage.reward_weights or [1.0] * len(sources)
    return " + ".join(f"{w:g} x {source}" for w, source in zip(weights, sources, strict=True))


def heaviest_stage(cfg: Config, total: int, arch: ArchitectureConfig | None, on_gpu: bool) -> memory.Holding:
    """memory.stage_holding of the chain's trained stage that needs the most model-state memory."""
    ds, per_node, nodes = cfg.deepspeed, processes_per_node(cfg.launcher), cfg.launcher.nnodes
    trained = [s for s in cfg.stages.values() if STAGES[s.method].make_trainer is not None]
    holdings = [memory.stage_holding(s, cfg, arch, total, on_gpu) for s in trained]
    if not holdings:  # data stages alone: as a full fine-tune would
        holdings = [memory.Holding(total, 0, 4.0, 0.0, "fp32 weights, gradients, Adam")]
    return max(holdings, key=lambda hold: memory.model_states(ds, hold, per_node, nodes)[0])


def model_shape(cfg: Config, local_only: bool = False) -> tuple[int, ArchitectureConfig | None]:
    """(parameters, shape) of the base model; the shape is None for a family counted by building
    it (its LoRA adapters are not counted). OSError: no shape to estimate from."""
    total, _ = memory.model_parameter_counts(cfg.model, local_only=local_only)
    try:
        return total, memory.architecture(cfg.model, local_only=local_only)
    except OSError:
        return total, None


def model_state_estimate(
    cfg: Config,
    local_only: bool = False,
    on_gpu: bool | None = None,
    shape: tuple[int, ArchitectureConfig | None] | None = None,
) -> memory.Estimate:
    """The model-state memory of the chain's heaviest trained stage, per GPU (default: on GPUs
    when this machine has one, else on CPU workers) and CPU per node, for this config's DeepSpeed
    settings and processes. `shape`: model_shape's, when known. OSError: no shape to estimate from."""
    on_gpu = gpu_devices_present() if on_gpu is None else on_gpu
    total, arch = shape or model_shape(cfg, local_only)
    hold = heaviest_stage(cfg, total, arch, on_gpu)
    ds, per_node, nodes = cfg.deepspeed, processes_per_node(cfg.launcher), cfg.launcher.nnodes
    gpu, cpu = memory.model_states(ds, hold, per_node, nodes)
    if ds.stage is not None:
        basis = f"ZeRO-{ds.stage}: {hold.what}"
    else:
        ddp = ", DDP's gradient buckets" if per_node * nodes > 1 else ""
        basis = f"{gpu / total:.2g} bytes per parameter: {hold.what}{ddp}"
    return memory.Estimate(total, gpu, cpu, basis)


def memory_lines(cfg: Config, world: int, per_node: int) -> list[str]:
    """The memory lines of `posttrain plan=true`: model states per GPU, and a hint when they
    exceed this machine's GPU."""
    ds = cfg.deepspeed
    # one plain process: an estimate only from a config already on this machine (no hub request)
    alone = world == 1 and ds.stage is None
    try:
        shape = model_shape(cfg, local_only=alone)
    except OSError as e:  # a hub id offline with no registry numbers, a folder without config.json
        return [] if alone else [f"memory: no estimate ({str(e).strip().splitlines()[0][:200]})"]
    found = model_state_estimate(cfg, on_gpu=True, shape=shape)
    here = None if gpu_devices_present() else model_state_estimate(cfg, on_gpu=False, shape=shape)
    on_cpu = f", CPU per node {memory.gib(found.cpu_per_node)}" if found.cpu_per_node else ""
    states = f"model states per GPU {memory.gib(found.per_gpu)}{on_cpu} ({found.basis}; activations come on top)"
    if here is not None and here.per_gpu != found.per_gpu:  # CPU workers train in fp32
        on_cpu = f", CPU per node {memory.gib(here.cpu_per_node)}" if here.cpu_per_node else ""
        states += f"; on this machine's CPU workers {memory.gib(here.per_gpu)} each{on_cpu} ({here.basis})"
    lines = [f"memory: {memory.count(found.total)} parameters; {states}"]
    if (capacity := memory.gpu_memory()) and found.per_gpu > capacity:
        lines.append(
            f"memory: more than this GPU's {memory.gib(capacity)}; model.dtype=bfloat16 (8 bytes per parameter), "
            "peft=lora (2), or deepspeed=zero3 over several GPUs"
        )
    return lines
