"""The preemption guard: Slurm's signals set a flag; the trainer callback checkpoints and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


def test_in_an_interruptible_phase_a_signal_stops_the_work_at_once():
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted, match="SIGUSR1 during the reference pass"):
            with guard.interruptible("the reference pass"):
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(5)  # never reached: the handler raised where the work was
        # the next phase does not start either
        with pytest.raises(Preempted, match="SIGUSR1 before evaluation"):
            with guard.interruptible("evaluation"):
                pass


def test_outside_the_phases_a_signal_is_a_flag():
    with PreemptionGuard() as guard:
        with guard.interruptible("loading data"):
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # training: the callback saves a checkpoint at the step end
        assert guard.requested


def test_a_stop_swallowed_by_library_code_is_raised_again_until_it_leaves_the_phase():
    swallowed = 0
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted):
            with guard.interruptible("tokenizing"):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and swallowed < 2:
                    try:
                        if not guard.requested:
                            os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(0.05)
                    except BaseException:  # what a weakref callback does with an exception: ignore it
                        swallowed += 1
                time.sleep(1)  # raised again within RETRY_SECONDS
    assert swallowed == 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_shielded_write_is_not_cut_and_the_stop_follows_it():
    written = []
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted, match="SIGTERM during sampling"):
            with guard.interruptible("sampling"):
                with guard.shielded():
                    os.kill(os.getpid(), signal.SIGTERM)
                    written.append("lines and their count")
                written.append("never")
    assert written == ["lines and their count"]


def test_rank_0_work_in_a_single_process_hands_its_result_or_stops():
    with PreemptionGuard() as guard:
        assert guard.on_main("evaluating the base model", lambda: ({"exact_match": 0.5}, [])) == (
            {"exact_match": 0.5},
            [],
        )
        with pytest.raises(Preempted, match="SIGTERM during evaluating"):
            guard.on_main("evaluating the base model", lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))


WEAKREF_STOP = """
import os, signal, sys, time, weakref
from posttrain.preemption import Preempted, PreemptionGuard

class Thing:
    pass

def callback(_ref):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, inside the callback

with PreemptionGuard() as guard:
    try:
        with guard.interruptible("tokenizing"):
            thing = Thing()
            ref = weakref.ref(thing, callback)
            del thing  # the callback runs and Python swallows the stop
            assert ref() is None and guard.requested
            time.sleep(5)  # raised again within RETRY_SECONDS
    except Preempted as stop:
        print("stopped:", stop)
"""


def test_a_stop_raised_in_a_weakref_callback_prints_nothing_and_still_stops_the_phase():
    """Python cannot pass on an exception from a weakref callback: it prints "Exception ignored"
    with a traceback. The guard raises the stop again, so that print is noise and is dropped
    (in a process of its own: pytest replaces `sys.unraisablehook`)."""
    done = subprocess.run([sys.executable, "-c", WEAKREF_STOP], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("stopped: SIGTERM during tokenizing"), done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_an_error_library_code_raised_from_a_stop_leaves_the_phase_as_the_stop():
    """A C extension whose initialization a stop cut raises ImportError("initialization failed")
    from it (matplotlib's ft2font did): the phase stops as if the stop had come through."""
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted, match="SIGTERM during saving") as stopped:
            with guard.interruptible("saving"):
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                except Preempted as stop:
                    raise ImportError("initialization failed") from stop
    assert isinstance(stopped.value.__cause__, ImportError)
    # one that drops the stop and raises its own, unchained: a stop is in flight, so it is the stop
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted, match="SIGUSR1 during plotting"):
            with guard.interruptible("plotting"):
                try:
                    os.kill(os.getpid(), signal.SIGUSR1)
                    time.sleep(5)
                except Preempted:
                    pass
                raise RuntimeError("a library's own error")
    # an error with no stop behind it is the error
    with PreemptionGuard() as guard:
        with pytest.raises(RuntimeError, match="a real error"):
            with guard.interruptible("evaluation"):
                raise RuntimeError("a real error")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
