"""The `posttrain` command: Hydra composes the config once, posttrain validates it, writes
`resolved.yaml` into the run folder, prints the plan, and runs the stage chain.

    posttrain                                   # default recipe: tiny SFT -> DPO on CPU
    posttrain recipe=tiny_sft_orpo run.output_dir=/tmp/x
    posttrain align=orpo align.beta=0.2 plan=true
    posttrain --help ; posttrain --cfg job
    posttrain show outputs/tiny_sft_dpo/2026-11-25_10-00-00   # a run's stages, status, metrics
"""

from __future__ import annotations

from posttrain.preemption import (
    EXIT_PREEMPTED,
    RESUME,
    SIGNALS,
    Preempted,
    exit_preempted,
    stop_at_once,
    stop_behind,
)

if __name__ == "__main__":  # `python -m posttrain.cli`: before the heavier imports below
    stop_at_once(hard=True)

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from posttrain.artifacts import GateError, read_json, read_manifest
from posttrain.config import Config, config_dir
from posttrain.errors import ConfigError, PosttrainError, unknown_key
from posttrain.launch import run_workers, stop_file
from posttrain.locks import FileLock
from posttrain.origins import origins
from posttrain.pipeline import check_writable, run_pipeline
from posttrain.plan import check_references, check_writable_folder, load_config, plan_text
from posttrain.report import show
from posttrain.report.sweep import objective_value, ranked_objective, write_report
from posttrain.secrets import redact, scrub_file
from posttrain.stage_cache import check_run_folder, stage_keys


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


def hydra_error(error: Exception, args: list[str]) -> str:
    """One line for a command line Hydra could not compose: the key an override names that the
    config lacks (with the closest keys), the argument it cannot parse, or its own first line."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = error.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        siblings = [str(k) for k in cause.parent_node] if isinstance(cause.parent_node, DictConfig) else []
        if siblings:
            return f"{cause.full_key}: {unknown_key(str(cause.key), siblings)}"
        parent = cause.full_key.rpartition(".")[0]
        raw = _raw_value(parent, [a for a in args if not a.lstrip("+~").startswith(cause.full_key)])
        if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}"):  # `sft.data: ${data.sft}`
            target = f"{raw[2:-1]}.{cause.key}"
            whole = f"{parent}={{{cause.key}: ...}}"
            return f"{cause.full_key}: {parent} is {raw}; set {target} instead (or all of it: {whole})"
        return f"{cause.full_key}: not in the config; add it with +{cause.full_key}=..."
    if isinstance(error, OverrideParseException):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for arg in args:
            try:
                parser.parse_overrides([arg])
            except OverrideParseException as e:
                return f"{arg}: cannot be parsed ({str(e).splitlines()[0]}); quote values with [ ] , = or spaces"
    return str(error).strip().splitlines()[0]


def _raw_value(key: str, overrides: list[str]):
    """The value at `key` of the config these overrides compose, interpolations unresolved (None
    when they do not compose)."""
    try:
        tree = compose_tree(overrides, resolve=False)
    except Exception:  # a sweep or another mistake: the caller says what it can without it
        return None
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_output_dir(output_dir: str) -> str:
    """In a sweep (-m) each job writes to its numbered subfolder of run.output_dir."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if _in_sweep() else output_dir


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
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir() and not config.run.plan:
            objective = ranked_objective(sweep_dir, str(config.sweep.objective))
            print(write_report(sweep_dir, objective, str(config.sweep.direction)), flush=True)
            print(f"[posttrain] sweep table: {sweep_dir / 'sweep.md'} (and sweep.csv, sweep.png)", flush=True)


def _check_creatable(config: DictConfig, key: str) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        HydraConfig.instance().set_config(config)
        folder = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
    except Exception:  # an interpolation error: Hydra reports it in its own words
        return
    try:
        check_writable_folder(folder, "run.output_dir")
    except ConfigError as e:
        sys.exit(f"error: {e}")


def load(tree: DictConfig) -> tuple[Config, dict]:
    """Resolve and validate a composed tree; ConfigError names the key of any mistake."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        container = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that cannot resolve, a missing value
        raise ConfigError(str(e).splitlines()[0]) from None
    container["run"]["output_dir"] = _job_output_dir(container["run"]["output_dir"])
    cfg = load_config(container)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
        cfg.origins = origins(choices, list(hydra_cfg.overrides.task), list(cfg.stages))
    for name in cfg.auto_batches:  # workers (on any node) train with the number chosen here
        container[name]["per_device_train_batch_size"] = cfg.stages[name].per_device_train_batch_size
    container["sweep"]["objective"] = cfg.sweep.objective  # as the run is ranked (the sweep report reads it)
    return cfg, container


def _scrub_hydra_files() -> None:
    """Hydra saved the overrides and config into `.hydra/` before we ran: take secrets out."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().output_subdir is not None:
        for path in (Path(HydraConfig.get().runtime.output_dir) / HydraConfig.get().output_subdir).glob("*.yaml"):
            scrub_file(path)


def run(tree: DictConfig) -> tuple[Config, dict | None]:
    """Validate and run a composed config (also callable from Python with a composed tree): the
    validated config and the run's summary (None for a plan, or a sweep point its gate stopped).

    Exits with one line for a mistake, and with EXIT_PREEMPTED (75) after SIGTERM/SIGUSR1
    saved a checkpoint: the same command resumes.
    """
    try:
        cfg, container = load(tree)
        notes = check_references(cfg)
        keys = stage_keys(cfg)
        check_run_folder(cfg, keys)
        print(plan_text(cfg, keys, notes), flush=True)
        if cfg.run.plan:
            return cfg, None
        out = cfg.run.output_path
        check_writable(out)
        _scrub_hydra_files()
        with FileLock(
            out / ".posttrain.lock", "run folder", hint="wait for it to finish or choose another run.output_dir"
        ):
            stop_file(out).unlink(missing_ok=True)  # the stop request of an earlier, stopped attempt
            workers = launches_workers(cfg)
            if workers:
                # workers on other nodes read the frozen file: every path in it absolute
                container["run"].update(output_dir=str(out), cache_dir=str(cfg.run.cache_path))
            OmegaConf.save(OmegaConf.create(redact(container)), out / "resolved.yaml")
            return cfg, run_in_workers(cfg, out / "resolved.yaml") if workers else run_pipeline(cfg)
    except PosttrainError as e:
        if isinstance(e, GateError) and _in_sweep():  # the sweep goes on; its table shows this run as stopped
            print(f"error: {e}", file=sys.stderr, flush=True)
            return cfg, None
        sys.exit(f"error: {e}")
    except Preempted as e:
        print(f"[posttrain] stopped by {e}; {RESUME}", flush=True)
        sys.exit(EXIT_PREEMPTED)


def launches_workers(cfg: Config) -> bool:
    """Whether the run trains in worker processes (several, or DeepSpeed's one) rather than here."""
    return cfg.launcher.name != "local" or cfg.deepspeed.stage is not None


def run_in_workers(cfg: Config, resolved: Path) -> dict | None:
    """Start the workers on the frozen config and wait; their summary, or their exit as ours."""
    code = run_workers(cfg, resolved)
    if code == 0:
        return read_json(cfg.run.output_path / "summary.json")
    statuses = [(read_manifest(cfg.run.output_path / name) or {}).get("status") for name in cfg.stages]
    if "interrupted" in statuses:
        print(f"[posttrain] the workers stopped, keeping what they finished; {RESUME}", flush=True)
        sys.exit(EXIT_PREEMPTED)
    sys.exit(f"error: the workers failed (exit {code}); their output above names the cause")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(tree: DictConfig) -> float | None:
    """Returns sweep.objective's value (as load_config resolved it): what an Optuna sweep
    (hydra/sweeper=posttrain_optuna) optimises."""
    cfg, summary = run(tree)
    return objective_value(summary, cfg.sweep.objective) if summary else None


def compose_tree(overrides: list[str], resolve: bool = True) -> dict:
    """The config tree `posttrain <overrides>` would run, as plain Python (tests, benchmarks);
    `resolve=False` keeps interpolations as written."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="posttrain"):
        tree = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(tree)  # run.name and output_dir refer to hydra's settings
        with open_dict(tree):
            del tree["hydra"]
        return OmegaConf.to_container(tree, resolve=resolve)


def help_text(overrides: list[str]) -> str:
    """Hydra's help page (header, config groups, the composed config, footer), built directly:
    Hydra's own lists every group by composing it once more (~1 s of a 2 s `--help`)."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.object_type import ObjectType

    conf = Path(config_dir())
    texts = yaml.safe_load((conf / "config.yaml").read_text())["hydra"]["help"]
    groups = sorted(d.name for d in conf.iterdir() if d.is_dir() and d.name not in ("hydra", "shared"))
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
    # a stop signal before the run's guard takes over (start-up, Hydra, the plan) exits 75 too
    stop_at_once()
    try:
        _main()
    except SystemExit as e:  # run(): stopped, and said so
        if e.code == EXIT_PREEMPTED:
            exit_preempted()
        raise
    except BaseException as e:  # a stop, or an error library code raised from one (an import it cut)
        if (stop := stop_behind(e)) is None:
            raise
        print(f"[posttrain] stopped by {stop}; {RESUME}", flush=True)
        exit_preempted()
    for sig in SIGNALS:  # the run is complete: a stop signal from here on has nothing to stop
        signal.signal(sig, signal.SIG_IGN)


def _main() -> None:
    if sys.argv[1:2] == ["show"]:
        sys.exit(show.main(sys.argv[2:]))
    args = _shorthands(sys.argv[1:])
    if mistake := unknown_option(args):
        sys.exit(f"error: {mistake}")
    if "--help" in args or "-h" in args:
        print(help_text([a for a in args if a not in ("--help", "-h")]))
        return
    sys.argv = [sys.argv[0], *args]
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's own report
        _hydra_main()
        return
    from hydra.errors import HydraException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its multi-line report
    try:
        _hydra_main()
    except HydraException as e:
        sys.exit(f"error: {hydra_error(e, [a for a in args if not a.startswith('-')])}")


if __name__ == "__main__":
    main()
