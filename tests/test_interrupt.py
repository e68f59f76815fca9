"""Ctrl-C and SIGTERM as stop requests (topd_ds/interrupt.py): the first only records itself, the second stops at
once, the handlers from before come back. The whole-run behaviour (stop at a step boundary with a checkpoint) is
tests/test_soak.py's Ctrl-C test."""

import os
import signal

import pytest

from topd_ds.interrupt import Interrupted, StopRequest


def _send(signum):
    os.kill(os.getpid(), signum)  # delivered to the main thread before os.kill returns to the bytecode loop


@pytest.mark.parametrize("signum, second", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_first_signal_records_second_stops_now(signum, second, capfd):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest().install()
    try:
        assert not stop() and stop.signum is None
        _send(signum)  # no exception here: the code that was running goes on
        assert stop() and stop.signum == signum
        with pytest.raises(second) as info:
            _send(signum)
        if second is SystemExit:
            assert info.value.code == 128 + signum
        # the second signal already put the old handlers back
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        stop.restore()
    err = capfd.readouterr().err
    assert err.count("stopping after this step") == 1 and "again to stop now" in err, err


def test_the_launchers_sigterm_after_a_ctrl_c_is_the_same_request():
    """deepspeed's launcher answers Ctrl-C with SIGTERM to every rank: that must not turn the stop into an abort."""
    stop = StopRequest().install()
    try:
        _send(signal.SIGINT)
        _send(signal.SIGTERM)  # no SystemExit
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)  # the user's second Ctrl-C
    finally:
        stop.restore()


def test_restore_puts_back_the_handlers_from_before():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        stop = StopRequest().install()
        stop.restore()
        _send(signal.SIGTERM)
        assert seen == [signal.SIGTERM] and stop.signum is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interrupted_exit_codes_and_lines():
    assert Interrupted(signal.SIGINT).exit_code == 130 and str(Interrupted(signal.SIGINT)) == "interrupted (Ctrl-C)"
    assert Interrupted(signal.SIGTERM).exit_code == 143 and str(Interrupted(signal.SIGTERM)) == "terminated (SIGTERM)"
