"""The `posttrain` command: Hydra composes the config once, posttrain validates it, writes
`resolved.yaml` into the run folder, prints the plan, and runs the stage chain.

    posttrain                                   # default recipe: tiny SFT -> DPO on CPU
    posttrain recipe=tiny_sft_orpo run.output_dir=/tmp/x
    posttrain align=orpo align.beta=0.2 plan=true
    posttrain --help ; posttrain --cfg job
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from posttrain.config import Config, ConfigError, load_config
from posttrain.data.load import DataError


def config_dir() -> str:
    """conf/ as package data (wheel install), else the source checkout's conf/ (editable)."""
    packaged = Path(__file__).parent / "conf"
    source = Path(__file__).resolve().parents[1] / "conf"
    return str(packaged if packaged.is_dir() else source)


def _shorthands(argv: list[str]) -> list[str]:
    """`plan=true` is short for `run.plan=true`."""
    return [f"run.{a}" if a.startswith("plan=") else a for a in argv]


def _job_output_dir(output_dir: str) -> str:
    """In a sweep (-m) each job writes to its numbered subfolder of run.output_dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().runtime.output_dir
    return output_dir


def plan_text(cfg) -> str:
    """The stage chain as it will run, one line per stage."""
    lines = [f"model: {cfg.model.path}", f"run folder: {cfg.run.output_path}", "stages:"]
    previous = "base"
    for name, stage in cfg.stages.items():
        parent = previous if stage.init_from == "previous" else stage.init_from
        micro, accum = stage.per_device_train_batch_size, stage.gradient_accumulation_steps
        length = f"{stage.max_steps} steps" if stage.max_steps > 0 else f"{stage.num_train_epochs:g} epochs"
        lines.append(
            f"  {name}: {stage.method} from {parent}, data {stage.data.path} [{stage.data.split}], "
            f"lr {stage.learning_rate:g}, batch {micro}x{accum}, {length}"
        )
        previous = name
    return "\n".join(lines)


def load(tree: DictConfig) -> tuple[Config, dict]:
    """Resolve and validate a composed tree; ConfigError names the key of any mistake."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        container = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that cannot resolve, a missing value
        raise ConfigError(str(e).splitlines()[0]) from None
    container["run"]["output_dir"] = _job_output_dir(container["run"]["output_dir"])
    return load_config(container), container


def run(tree: DictConfig) -> dict | None:
    """Validate and run a composed config (also callable from Python with a composed tree)."""
    try:
        cfg, container = load(tree)
        print(plan_text(cfg), flush=True)
        if cfg.run.plan:
            return None
        from posttrain.pipeline import run_pipeline

        out = cfg.run.output_path
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(container), out / "resolved.yaml")
        return run_pipeline(cfg)
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(tree: DictConfig) -> None:
    run(tree)


def main() -> None:
    sys.argv = [sys.argv[0], *_shorthands(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
