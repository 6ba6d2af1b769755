"""Reading files as data, never as code: checkpoints and imported weights share one safe torch
loader, and pickled datasets (CIFAR's batches) one unpickler that only rebuilds arrays. Writing
them so that a failure leaves the previous file: atomic writes, and a run log that stops the run."""

import logging
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from setrain.errors import SetrainError

# How torch's weights_only unpickler refuses a class or function it does not allow: "Unsupported
# global: GLOBAL x", "GLOBAL posix.system whose module posix is blocked", and refused calls or builds.
REFUSED_CODE = re.compile(
    r"GLOBAL \S+ (was not an allowed|whose module)|unrecognized function|Can only (build|create)"
)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write` into path.tmp, flush it to disk, then rename it over `path`: a crash or
    a full disk mid-write leaves the previous file intact, and a failed write no temporary file.
    The write's own error is raised; callers say it in a sentence."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_output(path: Path, content: str | Callable[[BinaryIO], None]) -> None:
    """A command's output file (text, or what `content` writes, e.g. a figure's savefig),
    atomically; a failed write (a full disk, a read-only folder) is one sentence."""
    write = content if callable(content) else (lambda file: file.write(content.encode()))
    try:
        write_atomically(path, write)
    except OSError as error:
        raise SetrainError(
            f"Could not write {path} ({error.strerror or error}); free space or make {path.parent} "
            "writable, then run the command again."
        ) from error


def load_torch_file(path: Path, what: str, missing_fix: str, unreadable_fix: str):
    """`torch.load` with ``weights_only=True`` onto the CPU: a file that would need to run code to
    unpickle is refused, not executed. `what` names the file in the error ("Checkpoint x.pt");
    the fixes end the sentence for a missing and for an unreadable file."""
    if path.is_dir():
        raise SetrainError(f"{what} is a folder, not a file; {missing_fix}.")
    if not path.is_file():
        raise SetrainError(f"{what} does not exist; {missing_fix}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        if isinstance(error, pickle.UnpicklingError) and REFUSED_CODE.search(str(error)):
            raise SetrainError(
                f"{what} holds pickled Python objects, which could run code, so it is not loaded; "
                "save tensors only, e.g. torch.save(model.state_dict(), path)."
            ) from error
        raise SetrainError(
            f"{what} cannot be read ({type(error).__name__}): it is truncated, corrupt or not a "
            f"PyTorch file; {unreadable_fix}."
        ) from error


class CodeInPickle(pickle.UnpicklingError):
    """A pickled data file names a class or function that plain data and arrays do not need."""

    def __init__(self, path: str, call: str):
        super().__init__(f"{path} would call {call}")
        self.path, self.call = path, call


class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and refuses any other global,
    which plain `pickle.load` would import and call: a crafted file would run code as it is read."""

    # What rebuilding an array names: numpy 1 (the official CIFAR files) or 2, at any protocol.
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes, pickled at protocol 2
    }  # fmt: skip

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self.path = getattr(file, "name", "<pickle>")

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise CodeInPickle(self.path, f"{module}.{name}")
        return super().find_class(module, name)


def load_data_pickle(file, **kwargs):
    """`pickle.load(file, **kwargs)` that raises CodeInPickle instead of running a file's code."""
    return DataOnlyUnpickler(file, **kwargs).load()


class RunLog(logging.FileHandler):
    """The run's train.log (configs/train.yaml, hydra.job_logging). A write that fails (a full
    disk, a file that went away) raises one SetrainError from the logging call, so the run stops
    where it stands (checkpoints are atomic: last.pt is intact) instead of logging printing a
    traceback after every line; later records go to os.devnull, as the error is on its way out."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        failed, self.stream = self.stream, open(os.devnull, "w")
        try:
            failed.close()  # flushes what it buffered: fails again
        except OSError:
            pass
        reason = getattr(error, "strerror", None) or error
        run_dir = Path(self.baseFilename).parent
        raise SetrainError(
            f"Could not write the run's log {self.baseFilename} ({reason}); free space or fix the folder, "
            f"then continue with resume=auto hydra.run.dir={run_dir}"
        )
