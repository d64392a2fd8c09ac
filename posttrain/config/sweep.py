"""The `logger` section (conf/logger/: wandb, tensorboard or none) and the `sweep` section of
conf/config.yaml (what `posttrain -m` ranks its runs by).

    posttrain -m logger=wandb align.beta=0.05,0.1 sweep.objective=align.reward_acc
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.errors import require


@dataclass
class LoggerConfig:
    backend: str = "none"
    # wandb only
    project: str = "posttrain"
    entity: str | None = None
    # null: the run folder's name (a sweep's folder name for all its runs)
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # auto: online when an API key is known, else offline
    mode: str = "auto"

    def __post_init__(self) -> None:
        import importlib.util

        backends = ("none", "wandb", "tensorboard")
        require(self.backend in backends, "logger.backend", f"{self.backend!r} is not one of {', '.join(backends)}")
        modes = ("auto", "online", "offline", "disabled")
        require(self.mode in modes, "logger.mode", f"{self.mode!r} is not one of {', '.join(modes)}")
        if self.backend == "tensorboard":
            found = importlib.util.find_spec("tensorboard") is not None
            require(found, "logger.backend", "tensorboard is not installed: pip install tensorboard")


@dataclass
class SweepConfig:
    # `<stage>.<metric>` that picks the best run of a sweep (a summary column or metric key); a
    # stage that does not run hands it to the last stage that does (plan.chain_objective)
    objective: str = "align.exact_match"
    direction: str = "maximize"

    def __post_init__(self) -> None:
        directions = ("maximize", "minimize")
        require(self.direction in directions, "sweep.direction", f"{self.direction!r} is not one of {directions}")
        require("." in self.objective, "sweep.objective", f"{self.objective!r} is not <stage>.<metric>")
