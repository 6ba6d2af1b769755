"""SIGTERM (cluster pre-emption, `scancel`), SIGINT (Ctrl-C) and SLURM's warning signal end a
run with a checkpoint; after the warning signal the job is also requeued (`requeue_job`).

The handler only records the signal; the trainer checks it after an optimizer step and after an
epoch's checkpoint, saves, and stops. The record lasts as long as the process, so a signal that
no training step saw (one during validation, a checkpoint write, or between a sweep's jobs)
still stops the sweep (setrain.cli). A second signal falls through to Python's default and
interrupts at once.
"""

import logging
import os
import signal
import subprocess
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

# What SLURM sends before a pre-emption or the time limit (`--signal=USR2@120`, which
# hydra/launcher=slurm asks for through submitit; SUBMITIT_PREEMPT_SIGNAL names another).
REQUEUE_SIGNAL = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, REQUEUE_SIGNAL)
_received: str | None = None  # the first stop signal this process got, e.g. "SIGTERM"


def received() -> str | None:
    """The name of the first stop signal this process got, or None."""
    return _received


def _record(number, frame):
    global _received
    if _received is None:
        _received = signal.Signals(number).name
        return
    if number == signal.SIGINT:
        signal.default_int_handler(number, frame)  # raises KeyboardInterrupt
    signal.signal(number, signal.SIG_DFL)
    signal.raise_signal(number)


def record_stop_signals() -> None:
    """Record SIGTERM and SIGINT from now until the process ends (a sweep: across its jobs)."""
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for number in STOP_SIGNALS:
            signal.signal(number, _record)


class StopRequest:
    @property
    def signal_name(self) -> str | None:
        return _received

    @property
    def requested(self) -> bool:
        return _received is not None


@contextmanager
def stop_on_signals():
    """Record SIGTERM and SIGINT while the run trains, then restore the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    record_stop_signals()
    try:
        yield StopRequest()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class RunStopped(Exception):
    """The run saved a checkpoint and stopped on a signal; the entry point exits with 128 + signal."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.requeue = signal_name == REQUEUE_SIGNAL.name
        self.exit_code = exit_code(signal_name)


def exit_code(signal_name: str) -> int:
    """What a shell reports for a process ended by `signal_name`: 128 + its number."""
    return 128 + signal.Signals[signal_name].value


def requeue_job(rank: int) -> None:
    """After the run saved on REQUEUE_SIGNAL, put its SLURM job back in the queue; it continues
    from last.pt when it starts again (resume=auto: a sweep's job dir, SLURM_RESTART_COUNT).
    Under submitit (hydra/launcher=slurm) its own handler does it: it calls the launcher's
    checkpoint hook, runs `scontrol requeue` on rank 0 and exits. Without submitit (sbatch + srun)
    rank 0 runs `scontrol requeue` itself. Outside SLURM nothing is requeued."""
    handler = signal.getsignal(REQUEUE_SIGNAL)
    if callable(handler) and handler is not _record:
        handler(REQUEUE_SIGNAL, None)
    elif rank == 0 and "SLURM_JOB_ID" in os.environ:
        job = os.environ["SLURM_JOB_ID"]
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as error:
            log.warning("Could not requeue SLURM job %s (%s); submit it again to continue.", job, error)
            return
        log.info("Requeued SLURM job %s; it continues from the checkpoint when it starts again.", job)
