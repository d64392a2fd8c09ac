"""The preemption guard: Slurm's signals set a flag; the trainer callback checkpoints and stops."""

from __future__ import annotations

import os
import signal

import pytest
from transformers import TrainerControl, TrainerState

from posttrain.preemption import Preempted, PreemptionGuard


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_the_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    with PreemptionGuard() as guard:
        assert not guard.requested
        guard.check("before stage sft")  # nothing asked yet: no error
        os.kill(os.getpid(), sig)
        assert guard.signal_name == sig.name
        with pytest.raises(Preempted, match=f"{sig.name} before stage align"):
            guard.check("before stage align")
    assert signal.getsignal(sig) is before


def _step_end(guard: PreemptionGuard, step: int, max_steps: int = 6, should_save: bool = False) -> TrainerControl:
    control = TrainerControl(should_save=should_save)
    guard.callback().on_step_end(None, TrainerState(global_step=step, max_steps=max_steps), control)
    return control


def test_callback_checkpoints_and_stops_once_a_signal_came():
    with PreemptionGuard() as guard:
        control = _step_end(guard, 3)
        assert not control.should_save and not control.should_training_stop
        os.kill(os.getpid(), signal.SIGTERM)
        control = _step_end(guard, 3)
        assert control.should_save and control.should_training_stop


def test_no_checkpoint_at_the_last_step_even_when_one_is_due():
    with PreemptionGuard() as guard:
        assert _step_end(guard, 4, should_save=True).should_save
        assert not _step_end(guard, 6, should_save=True).should_save
        os.kill(os.getpid(), signal.SIGTERM)
        assert not _step_end(guard, 6).should_save  # the stage finishes and saves its final model instead
