"""Typed, validated config: the composed Hydra tree turned into dataclasses.

Hydra composes `conf/` + `recipes/` into a plain tree; `posttrain.plan.load_config` checks every
key against the dataclasses of this package (unknown keys, wrong types, bad values) and raises
`ConfigError` with one line that names the key and the allowed values, before any model is loaded.
One module per section, as the docs' configuration reference reads them:

    model.py      model, peft              (conf/model/, conf/peft/)
    data.py       data: sources, mixtures, curation   (conf/data/)
    stage.py      the fields every stage shares, eval, gate; batch arithmetic  (conf/shared/stage.yaml;
                  a method's own fields: posttrain/stages/<method>.py)
    run.py        run, and the root Config (conf/config.yaml)
    launcher.py   deepspeed, launcher; processes per node  (conf/deepspeed/, conf/launcher/)
    sweep.py      logger, sweep            (conf/logger/, conf/config.yaml)
    build.py      the builder: tree -> dataclasses, one error line per bad key; config_dir()

Everything is importable from here: `from posttrain.config import StageConfig, ConfigError`.
"""

from __future__ import annotations

from posttrain.config.build import PACKAGE_PREFIX, STAGE_PREFIX, build, check_local_path, config_dir
from posttrain.config.data import BALANCES, LIKELIHOOD_SCORERS, DataConfig, DataSource, ScoreConfig, SourceConfig
from posttrain.config.launcher import (
    LAUNCHERS,
    ZERO_STAGES,
    DeepSpeedConfig,
    LauncherConfig,
    gpu_devices_present,
    planned_world_size,
    processes_per_node,
    visible_gpus,
)
from posttrain.config.model import (
    HANDOFFS,
    PEFT_METHODS,
    ArchitectureConfig,
    ModelConfig,
    PeftConfig,
    TinyModelConfig,
)
from posttrain.config.run import Config, RunConfig
from posttrain.config.stage import (
    GATE_METRICS,
    EvalConfig,
    GateConfig,
    StageConfig,
    global_batch,
    resolve_batches,
    stage_peft,
)
from posttrain.config.sweep import LoggerConfig, SweepConfig
from posttrain.errors import ConfigError, require

__all__ = [
    # re-exported: plugins raise posttrain.config.ConfigError
    "ConfigError",
    "require",
    "PACKAGE_PREFIX",
    "STAGE_PREFIX",
    "build",
    "check_local_path",
    "config_dir",
    "DataConfig",
    "BALANCES",
    "LIKELIHOOD_SCORERS",
    "DataSource",
    "ScoreConfig",
    "SourceConfig",
    "LAUNCHERS",
    "ZERO_STAGES",
    "DeepSpeedConfig",
    "LauncherConfig",
    "gpu_devices_present",
    "planned_world_size",
    "processes_per_node",
    "visible_gpus",
    "HANDOFFS",
    "PEFT_METHODS",
    "ArchitectureConfig",
    "ModelConfig",
    "PeftConfig",
    "TinyModelConfig",
    "Config",
    "RunConfig",
    "GATE_METRICS",
    "EvalConfig",
    "GateConfig",
    "StageConfig",
    "global_batch",
    "resolve_batches",
    "stage_peft",
    "LoggerConfig",
    "SweepConfig",
]
