"""Preemption: SIGTERM or SIGUSR1 (what Slurm sends before it kills a job) asks the run to stop.

The handler only sets a flag. During training a callback sees it after the current
optimizer step, saves a checkpoint and stops the trainer; between stages the pipeline
checks it. The stage's manifest is then marked `interrupted` and the process exits with
EXIT_PREEMPTED, which `launch/slurm.sbatch` answers with `scontrol requeue`.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from posttrain.distributed import any_rank

# EX_TEMPFAIL from sysexits.h: "try again later"
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the pipeline once the current work is saved."""


class PreemptionGuard:
    """`stop_file`: a file whose appearance asks every rank to stop like a signal would (the head
    process writes it when it is signalled: torchrun starts its workers in sessions of their own,
    and on other nodes a signal may never reach them)."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.signal_name: str | None = None
        self.stop_file = stop_file
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        print(f"[posttrain] {self.signal_name} received: saving a checkpoint and stopping", flush=True)

    def __enter__(self) -> PreemptionGuard:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested_here(self) -> bool:
        """Whether this process was signalled or the stop file appeared (no other rank asked)."""
        if not self.requested and self.stop_file is not None and self.stop_file.exists():
            self.signal_name = f"a stop request ({self.stop_file})"
        return self.requested

    def agreed(self) -> bool:
        """Whether any rank of the run was asked to stop (every rank must stop at the same step)."""
        self.requested_here()
        if any_rank(self.requested) and not self.requested:
            self.signal_name = "a stop signal to another rank"
        return self.requested

    def check(self, where: str) -> None:
        if self.agreed():
            raise Preempted(f"{self.signal_name} {where}")

    def callback(self) -> Any:
        """A TrainerCallback that checkpoints and stops training once a signal came.

        It also keeps a checkpoint off the last step: the pipeline saves the final model right
        after it, and transformers resumed from a last-step checkpoint trains one step too many.
        """
        from transformers import TrainerCallback

        guard = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= state.max_steps:
                    control.should_save = False
                elif guard.agreed():
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopOnSignal()
