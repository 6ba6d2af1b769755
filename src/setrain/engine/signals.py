"""SIGTERM (cluster pre-emption, `scancel`) and SIGINT (Ctrl-C) end a run with a checkpoint.

The handler only records the signal; the loop checks it after an optimizer step, saves, and
stops. A second Ctrl-C falls through to Python's default and interrupts at once.
"""

import signal
import threading
from contextlib import contextmanager


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None

    def _record(self, number, frame):
        self.signal_name = signal.Signals(number).name
        signal.signal(number, signal.SIG_DFL if number == signal.SIGTERM else signal.default_int_handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextmanager
def stop_on_signals():
    """Record SIGTERM and SIGINT while the run trains, then restore the previous handlers."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # Python allows handlers only there
        yield request
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    for number in previous:
        signal.signal(number, request._record)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class RunStopped(Exception):
    """The run saved a checkpoint and stopped on a signal; the entry point exits with 128 + signal."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal.Signals[signal_name].value
