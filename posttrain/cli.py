"""The `posttrain` command: Hydra composes the config once, posttrain validates it, writes
`resolved.yaml` into the run folder, prints the plan, and runs the stage chain.

    posttrain                                   # default recipe: tiny SFT -> DPO on CPU
    posttrain recipe=tiny_sft_orpo run.output_dir=/tmp/x
    posttrain align=orpo align.beta=0.2 plan=true
    posttrain --help ; posttrain --cfg job
    posttrain show outputs/tiny_sft_dpo/2026-11-25_10-00-00   # a run's stages, status, metrics
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from posttrain.config import Config, ConfigError, load_config
from posttrain.data.load import DataError
from posttrain.secrets import redact, scrub_file


def config_dir() -> str:
    """conf/ as package data (wheel install), else the source checkout's conf/ (editable)."""
    packaged = Path(__file__).parent / "conf"
    source = Path(__file__).resolve().parents[1] / "conf"
    return str(packaged if packaged.is_dir() else source)


def _shorthands(argv: list[str]) -> list[str]:
    """`plan=true` is short for `run.plan=true`."""
    return [f"run.{a}" if a.startswith("plan=") else a for a in argv]


def config_repository():
    """Hydra's view of every config group: posttrain's `conf/` and installed search-path plugins."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path

    return ConfigRepository(create_config_search_path(config_dir()))


def unknown_option(args: list[str]) -> str | None:
    """A `group=option` override naming no option of that config group (posttrain's `conf/`
    and plugins' search paths), as one line with the allowed ones; Hydra's own spans a dozen."""
    from hydra.core.object_type import ObjectType

    repo = None
    for arg in args:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+").split("@")[0]
        if not sep or key.startswith(("~", "-")) or "." in group or any(c in value for c in "($") or not group:
            continue
        repo = repo or config_repository()
        if not repo.group_exists(group):
            continue
        allowed = repo.get_group_options(group, results_filter=ObjectType.CONFIG)
        for option in value.split(","):
            if option not in allowed and option != "null":
                return f"{group}={option}: no such option of {group}; allowed: {', '.join(allowed)}"
    return None


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_output_dir(output_dir: str) -> str:
    """In a sweep (-m) each job writes to its numbered subfolder of run.output_dir."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if _in_sweep() else output_dir


def describe_data(data) -> str:
    """`path [split]` of each source, with its weight or row count in a mixture."""
    parts = []
    for src in data.source_list():
        share = f" x{src.weight:g}" if src.weight is not None else f" {src.rows} rows" if src.rows else ""
        parts.append(f"{src.path} [{src.split}]{share}")
    return " + ".join(parts)


def plan_text(cfg, keys: dict[str, str]) -> str:
    """The stage chain as it will run, one line per stage, and which stages are reused or resumed."""
    from posttrain import memory
    from posttrain.config import stage_peft
    from posttrain.distributed import global_batch, plan_lines, planned_world_size
    from posttrain.stage_cache import StageIndex, place_stage
    from posttrain.stages import STAGES

    lines = [f"model: {cfg.model.path}", f"run folder: {cfg.run.output_path}", *plan_lines(cfg), "stages:"]
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
        reference = f", reference {model_of[stage.reference or parent]}" if spec.uses_reference else ""
        peft = stage_peft(stage, cfg.peft)
        adapters = f", {peft} ({cfg.peft.handoff})" if peft != "none" else ""
        reward = f", reward {stage.reward}" if spec.uses_reward else ""
        if spec.make_data is not None:
            lines.append(
                f"  {name}: {stage.method} sampled from {parent}, {stage.num_samples} replies per prompt "
                f"(temperature {stage.temperature:g}, up to {stage.max_new_tokens} tokens){reward}, "
                f"prompts {describe_data(stage.data)}"
            )
        else:
            lines.append(
                f"  {name}: {stage.method} from {parent}{reference}{adapters}{reward}, "
                f"data {describe_data(stage.data)}, lr {stage.learning_rate:g}, "
                f"batch {micro} x {accum} accumulation x {world} processes = {global_batch(stage, world)} per step, "
                f"{length}"
            )
            if stage.activation_checkpointing == "auto" and memory.gpu_memory() is not None:
                on, why = memory.activation_checkpointing(stage, cfg, local_only=world == 1)
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


class CheckRunFolder(Callback):
    """Registered in conf/config.yaml: before Hydra creates the run folder, a folder that cannot
    be created (under a file, on a read-only disk) is one error line instead of a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_creatable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_creatable(config, "hydra.sweep.dir")


class SweepReport(Callback):
    """Registered in conf/config.yaml: after the last job of a sweep, write and print its table."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from posttrain.sweep_report import write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir() and not config.run.plan:
            print(write_report(sweep_dir, str(config.sweep.objective), str(config.sweep.direction)), flush=True)
            print(f"[posttrain] sweep table: {sweep_dir / 'sweep.md'} (and sweep.csv, sweep.png)", flush=True)


def _check_creatable(config: DictConfig, key: str) -> None:
    import os

    from hydra.core.hydra_config import HydraConfig

    try:
        HydraConfig.instance().set_config(config)
        folder = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
    except Exception:  # an interpolation error: Hydra reports it in its own words
        return
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        sys.exit(f"error: run.output_dir: cannot create {folder}: {existing} is not a writable folder")


def load(tree: DictConfig) -> tuple[Config, dict]:
    """Resolve and validate a composed tree; ConfigError names the key of any mistake."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        container = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that cannot resolve, a missing value
        raise ConfigError(str(e).splitlines()[0]) from None
    container["run"]["output_dir"] = _job_output_dir(container["run"]["output_dir"])
    return load_config(container), container


def _scrub_hydra_files() -> None:
    """Hydra saved the overrides and config into `.hydra/` before we ran: take secrets out."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().output_subdir is not None:
        for path in (Path(HydraConfig.get().runtime.output_dir) / HydraConfig.get().output_subdir).glob("*.yaml"):
            scrub_file(path)


def run(tree: DictConfig) -> dict | None:
    """Validate and run a composed config (also callable from Python with a composed tree).

    Exits with one line for a mistake, and with EXIT_PREEMPTED (75) after SIGTERM/SIGUSR1
    saved a checkpoint: the same command resumes.
    """
    from posttrain.artifacts import ArtifactError, GateError
    from posttrain.locks import FileLock, LockedError
    from posttrain.preemption import EXIT_PREEMPTED, Preempted

    try:
        cfg, container = load(tree)
        from posttrain.stage_cache import check_run_folder, stage_keys

        keys = stage_keys(cfg)
        check_run_folder(cfg, keys)
        print(plan_text(cfg, keys), flush=True)
        if cfg.run.plan:
            return None
        from posttrain.launch import stop_file
        from posttrain.pipeline import check_writable, run_pipeline

        out = cfg.run.output_path
        check_writable(out)
        _scrub_hydra_files()
        with FileLock(out / ".posttrain.lock", "run folder"):
            stop_file(out).unlink(missing_ok=True)  # the stop request of an earlier, stopped attempt
            workers = launches_workers(cfg)
            if workers:
                # workers on other nodes read the frozen file: every path in it absolute
                container["run"].update(output_dir=str(out), cache_dir=str(cfg.run.cache_path))
            OmegaConf.save(OmegaConf.create(redact(container)), out / "resolved.yaml")
            if workers:
                return run_in_workers(cfg, out / "resolved.yaml")
            return run_pipeline(cfg)
    except GateError as e:
        if _in_sweep():  # the sweep goes on; its table shows this run as stopped
            print(f"error: {e}", file=sys.stderr, flush=True)
            return None
        sys.exit(f"error: {e}")
    except (ConfigError, DataError, ArtifactError) as e:
        sys.exit(f"error: {e}")
    except LockedError as e:
        sys.exit(f"error: {e}; wait for it to finish or choose another run.output_dir")
    except Preempted as e:
        print(f"[posttrain] stopped by {e}; re-run the same command to resume", flush=True)
        sys.exit(EXIT_PREEMPTED)


def launches_workers(cfg: Config) -> bool:
    """Whether the run trains in worker processes (several, or DeepSpeed's one) rather than here."""
    return cfg.launcher.name != "local" or cfg.deepspeed.stage is not None


def run_in_workers(cfg: Config, resolved: Path) -> dict | None:
    """Start the workers on the frozen config and wait; their summary, or their exit as ours."""
    from posttrain.artifacts import read_json, read_manifest
    from posttrain.launch import run_workers
    from posttrain.preemption import EXIT_PREEMPTED

    code = run_workers(cfg, resolved)
    if code == 0:
        return read_json(cfg.run.output_path / "summary.json")
    statuses = [(read_manifest(cfg.run.output_path / name) or {}).get("status") for name in cfg.stages]
    if "interrupted" in statuses:
        print("[posttrain] workers saved a checkpoint and stopped; re-run the same command to resume", flush=True)
        sys.exit(EXIT_PREEMPTED)
    sys.exit(f"error: the workers failed (exit {code}); their output above names the cause")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(tree: DictConfig) -> float | None:
    """Returns sweep.objective's value: what an Optuna sweep (hydra/sweeper=posttrain_optuna) optimises."""
    from posttrain.sweep_report import objective_value

    summary = run(tree)
    return objective_value(summary, str(tree.sweep.objective)) if summary else None


def compose_tree(overrides: list[str]) -> dict:
    """The config tree `posttrain <overrides>` would run, resolved to plain Python (tests, benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="posttrain"):
        tree = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(tree)  # run.name and output_dir refer to hydra's settings
        with open_dict(tree):
            del tree["hydra"]
        return OmegaConf.to_container(tree, resolve=True)


def help_text(overrides: list[str]) -> str:
    """Hydra's help page (header, config groups, the composed config, footer), built directly:
    Hydra's own lists every group by composing it once more (~1 s of a 2 s `--help`)."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.object_type import ObjectType

    conf = Path(config_dir())
    texts = yaml.safe_load((conf / "config.yaml").read_text())["hydra"]["help"]
    groups = sorted(d.name for d in conf.iterdir() if d.is_dir() and d.name != "hydra")
    repo = config_repository()  # options of installed packages' search paths too
    options = [f"{g}: {', '.join(repo.get_group_options(g, results_filter=ObjectType.CONFIG))}" for g in groups]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="posttrain"):
        config = OmegaConf.to_yaml(compose("config", overrides=overrides))
    return "\n".join(
        [
            texts["header"],
            "== Configuration groups ==",
            "Compose your configuration from those groups (group=option)\n",
            *options,
            "\n\n== Config ==",
            "Override anything in the config (foo.bar=value)\n",
            config,
            texts["footer"],
        ]
    )


def main() -> None:
    if sys.argv[1:2] == ["show"]:
        from posttrain.show import main as show

        sys.exit(show(sys.argv[2:]))
    args = _shorthands(sys.argv[1:])
    if mistake := unknown_option(args):
        sys.exit(f"error: {mistake}")
    if "--help" in args or "-h" in args:
        print(help_text([a for a in args if a not in ("--help", "-h")]))
        return
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


if __name__ == "__main__":
    main()
