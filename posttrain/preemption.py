"""Preemption: SIGTERM or SIGUSR1 (what Slurm sends before it kills a job) asks the run to stop.

During training the handler only sets a flag: a callback sees it after the current optimizer
step, saves a checkpoint and stops the trainer; between stages the pipeline checks it. Every
other long phase (data loading and tokenization, the reference log-prob pass, sampling pairs,
GRPO's generation, evaluation, saving and merging) runs inside `guard.interruptible(where)`:
there a signal raises Preempted at once, where the work is, so the run stops within seconds.
What such a phase finished is on disk already (the reference log-probs and the pairs samples
are written in parts, each through a temporary file and a rename); nothing it left looks
complete. The stage's manifest is then marked `interrupted` and the process exits with
EXIT_PREEMPTED, which `launch/slurm.sbatch` answers with `scontrol requeue`.

Several processes: a rank raises at once only where it works alone (rank 0's evaluation and
saving, which it hands to the others as "stopped"); in work every rank shares (collectives) the
signal is a flag that the loops read together between parts (`check`, `agreed`), so no rank
leaves while the others wait in a collective; GRPO's generation ends at the next token
(`stopping_criterion`) and the ranks then `check` together.

    with PreemptionGuard(stop_file) as guard:
        with guard.interruptible("evaluation"):
            ...   # SIGTERM here: Preempted("SIGTERM during evaluation")
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from posttrain.distributed import agree, any_rank, distributed, is_main

# EX_TEMPFAIL from sysexits.h: "try again later"
EXIT_PREEMPTED = 75
# what every stopped process tells its user
RESUME = "re-run the same command to resume"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(BaseException):
    """The run was asked to stop and what it finished is saved: exit EXIT_PREEMPTED.

    A BaseException, like KeyboardInterrupt: raised by the signal handler wherever the work is,
    it must not be taken for an error by library code's `except Exception`."""


def stop_behind(error: BaseException) -> Preempted | None:
    """The stop that caused `error`: a Preempted, one that library code wrapped (a C extension
    whose initialization a stop cut raises `ImportError("initialization failed")` from it), or
    the stop signal that came before the run's guard took over (see stop_at_once)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, Preempted):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if _EARLY_STOP is not None and isinstance(error, Exception):
        return Preempted(f"{_EARLY_STOP} before the run started")
    return None


def exit_preempted() -> NoReturn:
    """Exit EXIT_PREEMPTED without the interpreter's finalization. A stop raised where the work
    was may have cut a library's work mid-way (a dataset being built, a finalizer); destroying
    what it left at exit has crashed the interpreter ("Fatal Python error ... finalizing",
    SIGABRT), an exit Slurm's requeue does not answer. What the run keeps is on disk already
    and its context managers (the stage's manifest, the lock, wandb) have run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED)


# a stop signal that came before the run's guard took over (see stop_at_once)
_EARLY_STOP: str | None = None


def _quiet_swallowed_stops() -> None:
    """A stop raised where Python cannot pass it on (a weakref callback, a `__del__`) goes to
    `sys.unraisablehook`, which prints "Exception ignored in" and a traceback. The stop is not lost
    (the guard raises it again, `PreemptionGuard._retry`; before the guard, `_EARLY_STOP`), so it
    is dropped silently; anything else goes to the hook there was."""
    previous = sys.unraisablehook
    if getattr(previous, "posttrain_quiet_stops", False):
        return

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, Preempted):
            previous(unraisable)

    hook.posttrain_quiet_stops = True
    sys.unraisablehook = hook


def stop_at_once(hard: bool = False) -> None:
    """Until a guard takes over (the command's start-up: imports, Hydra, the plan), a stop signal
    ends the process at once with EXIT_PREEMPTED (nothing has been written that a re-run needs):
    by raising Preempted, or `hard`: by os._exit (while modules import, before anything can catch it)."""

    def handle(signum, frame) -> None:
        global _EARLY_STOP
        _EARLY_STOP = signal.Signals(signum).name  # the run's guard stops at once if this was swallowed
        reason = f"{_EARLY_STOP} before the run started"
        if hard:
            print(f"[posttrain] stopped by {reason}; {RESUME}", flush=True)
            os._exit(EXIT_PREEMPTED)
        raise Preempted(reason)

    _quiet_swallowed_stops()
    for sig in SIGNALS:
        signal.signal(sig, handle)


@dataclass(frozen=True)
class _Stopped:
    """What rank 0 hands the waiting ranks instead of a result when a signal stopped it."""

    reason: str


class PreemptionGuard:
    """`stop_file`: a file whose appearance asks every rank to stop like a signal would (the head
    process writes it when it is signalled: torchrun starts its workers in sessions of their own,
    and on other nodes a signal may never reach them)."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.signal_name: str | None = _EARLY_STOP
        self.stop_file = stop_file
        self._previous: dict[int, Any] = {}
        # the interruptible phases entered, innermost last (None: a shielded part inside one)
        self._phases: list[str | None] = []
        # a stop was raised in a phase (no second one is started: the first one's handlers run)
        self._raised = False
        # the stop raised in a phase that has not left it yet: raised again every RETRY_SECONDS
        # (code that swallows exceptions, a weakref callback say, may have caught it)
        self._in_flight: Preempted | None = None

    RETRY_SECONDS = 0.2

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self._phases and self._phases[-1] is not None and not self._raised:
            print(f"[posttrain] {self.signal_name} received during {self._phases[-1]}: stopping now", flush=True)
            raise self._stop(f"{self.signal_name} during {self._phases[-1]}")
        if not self._raised:
            print(f"[posttrain] {self.signal_name} received: saving a checkpoint and stopping", flush=True)

    def _retry(self, signum, frame) -> None:
        """SIGALRM while a stop is in flight: raise it again until it leaves its phase."""
        if self._in_flight is None:
            return
        signal.setitimer(signal.ITIMER_REAL, self.RETRY_SECONDS)
        if self._phases and self._phases[-1] is not None:
            raise self._in_flight

    def _stop(self, message: str, in_phase: bool = True) -> Preempted:
        """Preempted, raised in an interruptible phase (or on entering one); `alone`: by one rank of
        several (the others learn it from `hand_over_stop`)."""
        self._raised = True
        stop = Preempted(message)
        stop.alone = distributed()
        if in_phase:
            self._in_flight = stop
            signal.setitimer(signal.ITIMER_REAL, self.RETRY_SECONDS)
        return stop

    def __enter__(self) -> PreemptionGuard:
        _quiet_swallowed_stops()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._retry)
        return self

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def interruptible(self, where: str, alone: bool = False) -> Iterator[None]:
        """A phase a signal stops at once (Preempted raised where the work is), in a process that
        works alone: a single-process run, or `alone=True` (rank 0's own work, which the other ranks
        wait for). Elsewhere in a multi-process run the signal stays a flag for `check`."""
        if alone or not distributed():
            if self.requested_here():
                raise self._stop(f"{self.signal_name} before {where}", in_phase=False)
            self._phases.append(where)
            try:
                yield
            except BaseException as error:
                # an error while a stop is in flight is the stop's doing (library code that caught
                # it and raised its own): the phase stops; a real error comes back in the re-run
                in_flight = self._in_flight if isinstance(error, Exception) else None
                stop = stop_behind(error) or in_flight
                if stop is None:
                    raise
                self._in_flight = None  # it left the phase: no need to raise it again
                signal.setitimer(signal.ITIMER_REAL, 0)
                if stop is error:
                    raise
                raise stop from error
            finally:
                self._phases.pop()
        else:
            yield

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Inside an interruptible phase: a part a signal must not cut (a write and the count of
        what it wrote); a signal that came meanwhile stops the phase right after it."""
        self._phases.append(None)
        try:
            yield
        finally:
            self._phases.pop()
        where = self._phases[-1] if self._phases else None
        if where is not None and self.requested and not self._raised:
            raise self._stop(f"{self.signal_name} during {where}")

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
        """Every rank together: raise Preempted when any was asked to stop."""
        if self.agreed():
            self._raised = True
            raise Preempted(f"{self.signal_name} {where}")

    def stopping_criterion(self) -> Any:
        """For `generate(stopping_criteria=[...])`: every sequence ends at the next token once this
        process was asked to stop (several processes then stop together at a `check`)."""
        import torch
        from transformers import StoppingCriteria

        guard = self

        class StopRequested(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop = guard.requested_here()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        return StopRequested()

    # --- rank 0's own work, which the other ranks wait for ---------------------------------

    def on_main(self, where: str, work: Callable[[], Any]) -> Any:
        """`work()` on rank 0 alone, where a signal stops it at once; its result on every rank
        (the others wait for it, and stop with it)."""
        if not is_main():
            return self.handed_over()
        try:
            with self.interruptible(where, alone=True):
                result = work()
        except Preempted as stop:
            self.hand_over_stop(stop)
            raise
        return self.hand_over(result)

    def hand_over(self, value: Any) -> Any:
        """On rank 0: its result of work it did alone, to the ranks waiting in `handed_over`."""
        return agree(value)

    def hand_over_stop(self, stop: Preempted) -> None:
        """On rank 0, stopped in work it did alone: the waiting ranks stop too."""
        if getattr(stop, "alone", False):
            agree(_Stopped(str(stop)))

    def handed_over(self) -> Any:
        """On the other ranks: rank 0's result, or Preempted when it was stopped."""
        value = agree(None)
        if isinstance(value, _Stopped):
            self.signal_name = self.signal_name or "a stop signal to rank 0"
            self._raised = True
            raise Preempted(value.reason)
        return value

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
