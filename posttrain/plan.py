"""Can this run go: the composed config checked as a whole and the plan printed, before any data
or model loads. `posttrain` (and `posttrain plan=true`) calls it on the head node; workers load
the frozen config through `load_config` too, without the checks only the launch node can make.

    cfg = load_config(tree)              # every section built and checked, plugins loaded
    print(plan_text(cfg, stage_keys(cfg)))

What the plan prints lives in posttrain/plan_report.py (`plan_text`, `plan_lines` and
`model_state_estimate` are importable from here too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from posttrain import artifacts, checkpoints, hub, memory
from posttrain.config import (
    LIKELIHOOD_SCORERS,
    STAGE_PREFIX,
    Config,
    DataConfig,
    DeepSpeedConfig,
    LauncherConfig,
    LoggerConfig,
    ModelConfig,
    PeftConfig,
    RunConfig,
    ScoreConfig,
    StageConfig,
    SweepConfig,
    build,
    gpu_devices_present,
    planned_world_size,
    processes_per_node,
    resolve_batches,
    stage_peft,
)
from posttrain.data import formats
from posttrain.data.formats import DataError
from posttrain.data.load import check_source
from posttrain.errors import ConfigError, require, unknown_key
from posttrain.launch import read_hostfile
from posttrain.optim import BF16_OPTIMIZERS
from posttrain.origins import check_tuned_for
from posttrain.plan_report import model_state_estimate, plan_lines, plan_text  # noqa: F401  (re-exported)
from posttrain.rewards import check_reward_spec, import_function, reward_specs
from posttrain.stages import STAGES, load_plugins
from posttrain.stages.base import check_trainer_args

# --- the chain as a whole ---------------------------------------------------------------

# the built-in data (and a data stage's pairs): which stage kinds it fits
BUILTIN_KINDS = {"builtin:sft": ("sft", "prompt"), "builtin:preference": ("preference", "unpaired", "prompt")}
PAIRS_KINDS = ("preference", "unpaired")


def _check_scorer(
    name: str, score: ScoreConfig, earlier: list[str], reward_models: set[str], data_stages: set[str]
) -> None:
    """`data.score.by` names a reward source, or a likelihood scorer whose `model` is the base or an
    earlier causal-LM stage."""
    key = f"{name}.data.score"
    if score.by in LIKELIHOOD_SCORERS:
        allowed = [s for s in earlier if s not in reward_models and s not in data_stages]
        require(
            score.model in allowed,
            f"{key}.model",
            f"{score.model!r} is not a causal LM before {name!r}; allowed: {', '.join(allowed)}",
        )
    elif score.by is not None:
        check_reward_spec(score.by, f"{key}.by", [s for s in earlier if s in reward_models])


def check_chain(stages: dict[str, StageConfig], peft: PeftConfig) -> None:
    """Mistakes of the chain as a whole, found before anything loads: a reference given to a
    reference-free method, a stage started from a reward model, data that does not fit a method,
    QLoRA without a GPU."""
    reward_models = {name for name, s in stages.items() if STAGES[s.method].model_kind == "reward"}
    data_stages = {name for name, s in stages.items() if STAGES[s.method].model_kind == "none"}
    previous, earlier = "base", ["base"]
    for name, stage in stages.items():
        spec = STAGES[stage.method]
        if spec.uses_reward:
            sources = reward_specs(stage.reward)
            for i, source in enumerate(sources):
                key = f"{name}.reward" if isinstance(stage.reward, str) else f"{name}.reward[{i}]"
                check_reward_spec(source, key, [s for s in earlier if s in reward_models])
        parent = previous if stage.init_from == "previous" else stage.init_from
        require(
            parent not in reward_models,
            f"{name}.init_from",
            f"{stage.init_from!r} is the reward model {parent!r}, which does not generate; "
            f"start {stage.method} from one of: {', '.join(s for s in earlier if s not in reward_models)}",
        )
        if stage.reference is not None:
            require(
                spec.uses_reference,
                f"{name}.reference",
                f"{stage.method} is reference-free and takes no reference; remove {name}.reference "
                f"(methods with one: {', '.join(m for m, s in STAGES.items() if s.uses_reference)})",
            )
            allowed = [s for s in earlier if s not in reward_models]
            require(
                stage.reference in allowed,
                f"{name}.reference",
                f"{stage.reference!r} is not a causal LM before {name!r}; allowed: {', '.join(allowed)}",
            )
        if stage.eval.judge not in (None, "exact_match"):
            import_function(stage.eval.judge, f"{name}.eval.judge")
        if spec.model_kind == "reward":  # evaluated by held-out reward accuracy; eval.exact_match is ignored
            require(stage.eval.judge is None, f"{name}.eval.judge", "a reward model does not generate; set null")
            bound = stage.gate.min_exact_match
            require(bound is None, f"{name}.gate.min_exact_match", "a reward model does not generate; set null")
        _check_scorer(name, stage.data.score, earlier, reward_models, data_stages)
        _check_data_fits(name, stage, spec.data_kind)
        _check_stage_sources(name, stage, spec.data_kind, [s for s in earlier if s in data_stages])
        if stage_peft(stage, peft) == "qlora":
            _check_qlora(f"{name}.peft" if stage.peft else "peft.method")
        previous = name
        earlier.append(name)


def _check_data_fits(name: str, stage: StageConfig, kind: str) -> None:
    sources = stage.data.source_list()
    for i, source in enumerate(sources):
        key = f"{name}.data.sources[{i}]" if stage.data.sources else f"{name}.data"
        fits = formats.KIND_FORMATS[kind]
        if source.format != "auto":
            require(
                source.format in fits,
                f"{key}.format",
                f"{source.format!r} rows do not fit {stage.method} ({kind} data); allowed: {', '.join(fits)}",
            )
        kinds = BUILTIN_KINDS.get(source.path)
        if kinds is not None:
            other = next(p for p, k in BUILTIN_KINDS.items() if kind in k)
            require(
                kind in kinds,
                f"{key}.path",
                f"{source.path} is {kinds[0]} data and does not fit {stage.method} ({kind} data); use {other}",
            )


def _check_stage_sources(name: str, stage: StageConfig, kind: str, earlier_data_stages: list[str]) -> None:
    """`stage:<name>` sources name an earlier data stage, and its pairs fit this method."""
    for i, source in enumerate(stage.data.source_list()):
        if not source.path.startswith(STAGE_PREFIX):
            continue
        key = f"{name}.data.sources[{i}].path" if stage.data.sources else f"{name}.data.path"
        producer = source.path[len(STAGE_PREFIX) :]
        allowed = ", ".join(STAGE_PREFIX + s for s in earlier_data_stages) or "none (add a pairs stage before it)"
        require(producer in earlier_data_stages, key, f"{producer!r} is not an earlier data stage; allowed: {allowed}")
        require(
            kind in PAIRS_KINDS,
            key,
            f"{source.path} holds preference pairs, which {stage.method} ({kind} data) does not train on",
        )


def _check_qlora(key: str) -> None:
    require(
        importlib.util.find_spec("bitsandbytes") is not None,
        key,
        "qlora needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; on this machine use lora",
    )
    import torch

    cuda = gpu_devices_present() and torch.cuda.is_available()
    require(cuda, key, "qlora needs a CUDA GPU (4-bit NF4 weights); on this machine use lora")


# --- the config as a whole ---------------------------------------------------------------


def load_config(tree: dict, on_launch_node: bool = True) -> Config:
    """Validate a composed config tree (plain dict, interpolations resolved) into a `Config`.

    `on_launch_node`: also check what only the node that launches can see (the hostfile, its GPUs);
    workers reading the frozen config on other nodes skip that."""
    load_plugins()
    tree = dict(tree)
    tree.pop("hydra", None)
    sections = {
        "run": RunConfig,
        "model": ModelConfig,
        "data": DataConfig,
        "peft": PeftConfig,
        "deepspeed": DeepSpeedConfig,
        "launcher": LauncherConfig,
        "logger": LoggerConfig,
        "sweep": SweepConfig,
    }
    built = {name: build(cls, tree.pop(name, {}) or {}, name) for name, cls in sections.items()}
    run: RunConfig = built["run"]
    stages: dict[str, StageConfig] = {}
    allowed_methods = ", ".join(["none", *STAGES])
    for name in run.stages:
        require(name in tree, "run.stages", f"{name!r} has no config section; sections: {', '.join(tree) or 'none'}")
        section = dict(tree.pop(name) or {})
        method = section.get("method", "none")
        if method == "none":
            continue
        require(method in STAGES, f"{name}.method", f"unknown method {method!r}; allowed: {allowed_methods}")
        stage = build(STAGES[method].config_cls, section, name)
        stage.validate(name)
        check_trainer_args(STAGES[method], stage, name)
        check_speed_options(name, stage, built["model"], built["peft"], built["deepspeed"])
        if STAGES[method].data_kind != "preference":
            for bound in ("min_reward_accuracy", "min_reward_margin"):
                require(getattr(stage.gate, bound) is None, f"{name}.gate.{bound}", f"{method} has no rewards")
        allowed = ["base", "previous", *stages]
        require(
            stage.init_from in allowed,
            f"{name}.init_from",
            f"{stage.init_from!r} is not a stage that runs before {name!r}; allowed: {', '.join(allowed)}",
        )
        stages[name] = stage
    # stage sections left out of run.stages are not part of the chain and are not checked
    left_out = [name for name, section in tree.items() if isinstance(section, dict) and "method" in section]
    for name in tree:
        require(name in left_out, name, unknown_key(name, [*sections, *run.stages, *left_out]))
    require(bool(stages), "run.stages", "no stage runs (every method is none); set sft=default or align=dpo")
    check_tuned_for(run, built["model"])
    check_chain(stages, built["peft"])
    objective, note = chain_objective(built["sweep"].objective, list(stages), [*run.stages, *left_out])
    built["sweep"].objective = objective
    cfg = Config(stages=stages, **built, notes=[note] if note else [])
    resolve_auto_batches(cfg)
    resolve_batches(stages, planned_world_size(built["launcher"]))
    if on_launch_node:
        check_distributed(cfg)
    return cfg


def chain_objective(objective: str, chain: list[str], sections: list[str]) -> tuple[str, str | None]:
    """sweep.objective as runs are ranked by it, and a note when it moved: a stage section that
    does not run (left out of run.stages, or method none) hands its metric to the last stage that
    runs. A stage that no section defines is an error."""
    stage, _, metric = objective.partition(".")
    known = ["base", *sections]
    require(stage in known, "sweep.objective", f"{stage!r} is not a stage; allowed: {', '.join(known)}")
    if stage in ["base", *chain]:
        return objective, None
    ranked = f"{chain[-1]}.{metric}"
    return ranked, f"sweep.objective: {stage} does not run; runs are ranked by {ranked}"


def resolve_auto_batches(cfg: Config, capacity: float | None = None) -> None:
    """Put a number in every `per_device_train_batch_size: auto` (memory.auto_micro_batch), for
    this machine's device (a GPU, else the RAM of its CPU workers) or `capacity` bytes."""
    world = planned_world_size(cfg.launcher)
    auto = [name for name, stage in cfg.stages.items() if stage.per_device_train_batch_size == "auto"]
    on_gpu = True
    if auto and capacity is None:
        capacity, on_gpu = memory.device_memory(processes_per_node(cfg.launcher))
    for name in auto:
        stage, spec = cfg.stages[name], STAGES[cfg.stages[name].method]
        key = f"{name}.per_device_train_batch_size"
        require(spec.make_trainer is not None, key, f"auto: {stage.method} trains nothing; give a number")
        micro, why = memory.auto_micro_batch(name, stage, cfg, spec.data_kind, capacity, world, on_gpu)
        stage.per_device_train_batch_size = micro
        cfg.auto_batches[name] = why


def check_speed_options(
    name: str, stage: StageConfig, model: ModelConfig, peft: PeftConfig, ds: DeepSpeedConfig
) -> None:
    """padding_free, optimizer, compile and liger where they cannot work, as one line each."""
    spec = STAGES[stage.method]
    if stage.padding_free:
        able = ", ".join(m for m, s in STAGES.items() if s.padding_free)
        require(
            spec.padding_free,
            f"{name}.padding_free",
            f"{stage.method} has no padding-free path; methods with one: {able}",
        )
    if stage.optimizer in BF16_OPTIMIZERS:
        key = f"{name}.optimizer"
        require(spec.make_trainer is not None, key, f"{stage.method} trains nothing; leave it at adamw")
        require(
            stage_peft(stage, peft) == "none",
            key,
            f"{stage.optimizer} is for full fine-tunes; LoRA trains small fp32 adapters: use adamw",
        )
        require(
            ds.stage is None,
            key,
            f"{stage.optimizer} needs deepspeed=none (DeepSpeed keeps its own fp32 copy and Adam)",
        )
        require(
            model.dtype in ("auto", "bfloat16"),
            key,
            f"{stage.optimizer} trains bf16 weights; model.dtype={model.dtype} asks for others (use auto or bfloat16)",
        )
    if stage.liger:
        require(
            importlib.util.find_spec("liger_kernel") is not None,
            f"{name}.liger",
            "liger-kernel is not installed: pip install liger-kernel (its kernels need a CUDA GPU)",
        )
        require(gpu_devices_present(), f"{name}.liger", "Liger's Triton kernels need a CUDA GPU; this machine has none")
    if stage.compile:
        require(spec.make_trainer is not None, f"{name}.compile", f"{stage.method} trains nothing; leave it false")


def check_distributed(cfg: Config) -> None:
    """Mistakes that would only crash on the cluster, found where the config is composed (the
    checks of the chain and of each section ran already)."""
    launcher = cfg.launcher
    if launcher.name == "deepspeed" and launcher.hostfile:
        path = Path(launcher.hostfile).expanduser()
        require(not path.is_dir(), "launcher.hostfile", f"{path} is a folder; give the hostfile in it")
        require(path.is_file(), "launcher.hostfile", f"{path} does not exist")
        hosts = read_hostfile(path)
        require(bool(hosts), "launcher.hostfile", f"{launcher.hostfile} names no host (lines: `host slots=N`)")
        require(
            launcher.nnodes <= len(hosts),
            "launcher.nnodes",
            f"{launcher.nnodes} nodes but the hostfile {launcher.hostfile} names {len(hosts)}",
        )
        if launcher.gpus is not None:
            short = [h for h, slots in hosts[: launcher.nnodes] if slots < launcher.gpus]
            require(
                not short,
                "launcher.gpus",
                f"{launcher.gpus} processes per node but {', '.join(short)} has fewer slots in {launcher.hostfile}",
            )
    if launcher.name != "local" and launcher.nnodes == 1 and not launcher.srun and launcher.gpus:
        visible = 0  # no GPU: CPU workers over gloo, any number
        if gpu_devices_present():
            import torch

            visible = torch.cuda.device_count()
        require(
            not visible or launcher.gpus <= visible,
            "launcher.gpus",
            f"{launcher.gpus} processes but this node has {visible} GPUs; set launcher.gpus={visible} or fewer",
        )
    if launcher.name == "accelerate" and launcher.nnodes > 1:
        require(
            launcher.node_rank is not None or launcher.srun,
            "launcher.node_rank",
            "accelerate on several nodes needs this node's rank (or launcher.srun=true under Slurm)",
        )


# --- what the config refers to ------------------------------------------------------------


def check_references(cfg: Config) -> list[str]:
    """Everything the config names on disk or on the hub, checked on the launch node before any
    data or model loads: the folders the run writes, the model, every local data file (opened,
    every row checked), the hub (asked once). Returns notes for the plan."""
    check_writable_folder(cfg.run.output_path, "run.output_dir")
    for folder in ("", "stages", "models", "data", "evals", "ref_logps"):  # what the run writes in the cache
        check_writable_folder(cfg.run.cache_path / folder, "run.cache_dir")
    notes = _check_model(cfg)
    for name, stage in cfg.stages.items():
        for source in stage.data.source_list():
            try:
                check_source(source, STAGES[stage.method].data_kind)
            except DataError as e:
                raise DataError(f"{name}.data: {e}") from None
            if hub.is_hub_id(source.path) and not (online := hub.reachable())[0]:
                notes.append(f"{name}.data: {source.path} is read from the datasets cache ({online[1]})")
    return notes


def check_writable_folder(folder: Path, key: str) -> None:
    """A folder the run will create or write into: making a folder and writing a file where it goes works."""
    if (why := artifacts.unwritable(folder)) is not None:
        raise ConfigError(f"{key}: cannot create {folder}: {why}")


def _check_model(cfg: Config) -> list[str]:
    """The base model: a folder holding config.json and whole weights, a readable GGUF file, an
    installed package's file, or a hub id the hub or the cache can give."""
    if cfg.model.path.startswith("builtin:"):
        return []
    path, notes = checkpoints.check(cfg.model, cfg.run.cache_path)
    local = Path(path).expanduser()
    if checkpoints.is_gguf(path) and local.is_file():
        return notes
    if local.is_file():
        raise ConfigError(
            f"model.path: {path} is a file; give the model's folder (config.json, weights), a .gguf file or a hub id"
        )
    if local.is_dir():
        require((local / "config.json").is_file(), "model.path", f"{path} holds no config.json; not a model folder")
        try:
            checkpoints.check_folder(local)
        except ConfigError as e:
            if not cfg.run.plan:
                raise
            notes.append(f"{e}: a run would stop here")
        return notes
    online, why = hub.reachable()
    if online:
        return notes
    if hub.cached(path, cfg.model.revision):
        return [*notes, f"model.path: {path} from the local hub cache ({why})"]
    missing = f"{path!r} is not in the local hub cache and the hub cannot be reached ({why})"
    if cfg.run.plan:
        return [f"model.path: {missing}: a run would stop here"]
    raise ConfigError(f"model.path: {missing}; download it first (huggingface-cli download {path}) or give a folder")
