"""Ctrl-C and SIGTERM during training: a request to stop at the next step boundary, not an exception raised
wherever the main thread happens to be.

Python raises KeyboardInterrupt (or our SIGTERM handler's SystemExit) between any two bytecodes of the main
thread, also inside library code that is not written to survive it. Both were seen here (docs/RELIABILITY.md,
"Ctrl-C in the middle of a step"): an interrupt inside ZeRO-3's partitioned forward/backward left torch's functorch
layer stack inconsistent, and the `finally` blocks then failed with "INTERNAL ASSERT FAILED at
DynamicLayer.cpp:220" (exit 1 instead of 130); and after another, `writer.close()` hung for 2 minutes: TensorBoard's
writer thread never woke for the shutdown item already in its queue, until its 120 s flush timer.

So while the loop runs, the first SIGINT or SIGTERM only records itself: rank 0 sees it before it hands out the
next batch, sends every rank "no batch" instead (the path a server failure takes), and every rank saves a
checkpoint of that step and leaves the loop with nothing half-done. The same signal a second time stops at once,
the old way; a different one after the first (the launcher's SIGTERM after a Ctrl-C) changes nothing.
"""

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Raised at a step boundary after a stop was requested; `signum` is the signal that asked."""

    def __init__(self, signum: int):
        super().__init__("interrupted (Ctrl-C)" if signum == signal.SIGINT else
                         f"terminated ({signal.Signals(signum).name})")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal stopped: 130, 143


class StopRequest:
    """`stop = StopRequest().install()`; `stop.signum` is None until a SIGINT/SIGTERM arrives. `stop.restore()`
    puts back the handlers that were there before (a Ctrl-C during the clean-up then acts at once). Signal
    handlers run in the main thread only, so this is used from there."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __call__(self) -> bool:
        """True once a stop was requested: a predicate for waits that poll (Pipeline.get)."""
        return self.signum is not None

    def _on_signal(self, signum, frame):
        if self.signum is not None and signum != self.signum:
            # another signal after the first is the same request: the deepspeed launcher answers its own Ctrl-C by
            # sending SIGTERM to every rank at once (deepspeed/launcher/launch.py:251-270), then SIGKILL after 30 s
            return
        if self.signum is not None:  # the same signal again: stop now, wherever we are
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        # os.write, not print: a handler that prints while the interrupted code is printing raises "reentrant call"
        os.write(2, f"\n{name}: stopping after this step with a checkpoint ({name} again to stop now, "
                    f"without one)\n".encode())
