"""Reading torch files as data: checkpoints and imported weights share one safe loader."""

import pickle
import re
from pathlib import Path

import torch

from setrain.errors import SetrainError

# How torch's weights_only unpickler refuses a class or function it does not allow: "Unsupported
# global: GLOBAL x", "GLOBAL posix.system whose module posix is blocked", and refused calls or builds.
REFUSED_CODE = re.compile(
    r"GLOBAL \S+ (was not an allowed|whose module)|unrecognized function|Can only (build|create)"
)


def load_torch_file(path: Path, what: str, missing_fix: str, unreadable_fix: str):
    """`torch.load` with ``weights_only=True`` onto the CPU: a file that would need to run code to
    unpickle is refused, not executed. `what` names the file in the error ("Checkpoint x.pt");
    the fixes end the sentence for a missing and for an unreadable file."""
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
