"""The `run` section of conf/config.yaml (folders, seed, the stage chain, reuse and resume) and the
root `Config` that holds every section, built by `posttrain.plan.load_config`.

    posttrain run.output_dir=/tmp/x run.stages=[sft] run.reuse=false
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config.data import DataConfig
from posttrain.config.launcher import DeepSpeedConfig, LauncherConfig
from posttrain.config.model import ModelConfig, PeftConfig
from posttrain.config.stage import StageConfig
from posttrain.config.sweep import LoggerConfig, SweepConfig
from posttrain.errors import require


@dataclass
class RunConfig:
    name: str = "posttrain"
    output_dir: str = "outputs/posttrain"
    cache_dir: str = "~/.cache/posttrain"
    seed: int = 0
    # the stage chain, in order: names of top-level stage sections
    stages: list[str] = field(default_factory=lambda: ["sft", "align"])
    # validate, print the plan and exit without training
    plan: bool = False
    # reuse a complete stage with the same key (from this folder or any run on the same cache_dir)
    reuse: bool = True
    # continue an interrupted stage from its last checkpoint
    resume: bool = True
    # every rank writes the rows of each of its batches (digests), the losses it logged and its peak
    # memory (RSS, CUDA) to <stage>/ranks/rank-N.jsonl: to check that ranks train on disjoint
    # shards and agree, and what each holds
    rank_logs: bool = False
    # the model the recipe's settings were tuned for: tiny (the built-in model: any other
    # model.path stops the run), pretrained (any pretrained checkpoint, not the tiny model), null (any)
    tuned_for: str | None = None

    def __post_init__(self) -> None:
        allowed = ("tiny", "pretrained", None)
        require(self.tuned_for in allowed, "run.tuned_for", f"{self.tuned_for!r} is not one of tiny, pretrained, null")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser().resolve()


@dataclass
class Config:
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    peft: PeftConfig
    deepspeed: DeepSpeedConfig
    launcher: LauncherConfig
    logger: LoggerConfig
    sweep: SweepConfig
    # stage name -> its config, in chain order; stages whose method is `none`, and stage sections
    # left out of run.stages, are not in it
    stages: dict[str, StageConfig]
    # stage name -> why `per_device_train_batch_size: auto` chose its number (for the plan)
    auto_batches: dict[str, str] = field(default_factory=dict)
    # stage name -> field -> where its value came from (posttrain/origins.py; for the plan)
    origins: dict[str, dict[str, str]] = field(default_factory=dict)
    # what loading the config decided on its own (a sweep objective moved), printed with the plan
    notes: list[str] = field(default_factory=list)
