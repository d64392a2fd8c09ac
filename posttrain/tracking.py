"""Experiment trackers, one tracker run per trained stage (`logger=wandb|tensorboard`).

wandb: each stage is a run with `job_type=<stage>`, `group=<run folder name>` (a sweep's
runs share the sweep folder's name as group), the stage's resolved config, its training
logs and its final metrics; with no API key (and no WANDB_MODE) it logs offline and says
so once. TensorBoard: event files in `<stage>/tensorboard`. `metrics.jsonl` is written
whatever the logger.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from posttrain.config import LoggerConfig
from posttrain.secrets import redact

_said_offline = False


def wandb_mode(cfg: LoggerConfig) -> str:
    """online when a key is known (env or `wandb login`), else offline; WANDB_MODE or logger.mode wins."""
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    return "online" if netrc.exists() and "api.wandb.ai" in netrc.read_text() else "offline"


def group_name(run_folder: Path) -> str:
    """The run folder's name; in a sweep (numbered job folders) the sweep folder's name."""
    return run_folder.parent.name if run_folder.name.isdigit() else run_folder.name


class StageTracker:
    """Context manager around one stage's training: trainer callbacks in, final metrics out."""

    def __init__(self, cfg: LoggerConfig, stage: str, run_folder: Path, stage_folder: Path, config: dict[str, Any]):
        self.cfg, self.stage, self.run_folder, self.stage_folder = cfg, stage, run_folder, stage_folder
        self.config = redact(config)
        self.wandb_run = None
        self.writer = None

    def __enter__(self) -> StageTracker:
        global _said_offline
        if self.cfg.backend == "wandb":
            import wandb

            mode = wandb_mode(self.cfg)
            if mode == "offline" and not _said_offline:
                print(
                    f"[posttrain] wandb: no API key found, logging offline under {self.run_folder}/wandb "
                    "(upload later with `wandb sync`)",
                    flush=True,
                )
                _said_offline = True
            group = self.cfg.group or group_name(self.run_folder)
            self.wandb_run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                group=group,
                job_type=self.stage,
                name=f"{self.run_folder.name}/{self.stage}" if self.run_folder.name.isdigit() else self.stage,
                tags=list(self.cfg.tags),
                config=self.config,
                dir=str(self.run_folder),
                mode=mode,
                reinit="finish_previous",
            )
        elif self.cfg.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.stage_folder / "tensorboard"))
        return self

    def callbacks(self) -> list:
        """transformers callbacks that send the trainer's logs to this tracker."""
        if self.wandb_run is not None:
            from transformers.integrations import WandbCallback

            return [WandbCallback()]  # logs into the run opened above
        if self.writer is not None:
            from transformers.integrations import TensorBoardCallback

            return [TensorBoardCallback(tb_writer=self.writer)]
        return []

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        numbers = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        if self.wandb_run is not None:
            self.wandb_run.summary.update(numbers)
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)

    def __exit__(self, *exc) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if exc[0] is None else 1)
        if self.writer is not None:
            self.writer.close()
