"""Checkpoints: written atomically, read as data only (``weights_only=True``), never as code."""

import errno
import os
from pathlib import Path

import torch
from torch import nn

from setrain.errors import SetrainError
from setrain.files import load_torch_file

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash, or a disk that fills up, mid-write leaves
    the previous file intact (and a failed write leaves no temporary file behind)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        kept = f" (the previous {path.name} is intact)" if path.is_file() else ""
        resume = f"continue with resume=auto hydra.run.dir={path.parent.parent}"
        if error.errno == errno.ENOSPC:
            raise SetrainError(
                f"The disk is full: could not write checkpoint {path}{kept}; free space on it, then {resume}."
            ) from error
        raise SetrainError(
            f"Could not write checkpoint {path} ({error.strerror or error}){kept}; make {path.parent} "
            f"writable, then {resume}."
        ) from error


RESUME_FIXES = (
    "pass resume=<path to a checkpoint .pt file> or resume=auto to continue from this run "
    "directory's checkpoints/last.pt",
    "resume from another one, such as checkpoints/best.pt",
)


def load_checkpoint(path: Path | str, fixes: tuple[str, str] = RESUME_FIXES) -> dict:
    """Read a setrain training checkpoint onto the CPU, refusing anything that is not one.

    `fixes` end the error sentence for a missing and for an unreadable file; the defaults speak
    to `resume=`, other commands (setrain.analyze) name their own option.
    """
    path = Path(path)
    state = load_torch_file(path, f"Checkpoint {path}", missing_fix=fixes[0], unreadable_fix=fixes[1])
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise SetrainError(
            f"Checkpoint {path} is not a setrain training checkpoint (it lacks "
            f"{', '.join(REQUIRED_KEYS)}); pass one written by setrain under checkpoints/."
        )
    return state


def load_model_state(model: nn.Module, state_dict: dict, source: Path | str) -> None:
    """Load weights, naming the keys and shapes that differ rather than failing deep in torch; a
    classifier of another size, alone, means that the data has another number of classes."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    resized = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    shapes = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}" for key in resized]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if not problems:
        model.load_state_dict(state_dict)
        return
    classifier = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    if not missing and not unexpected and {key.rpartition(".")[0] for key in resized} == {classifier}:
        weight = f"{classifier}.weight"
        raise SetrainError(
            f"Checkpoint {source} classifies {state_dict[weight].shape[0]} classes but this dataset has "
            f"{expected[weight].shape[0]} ({problems[0]}); resume on the data it was trained on, or "
            f"fine-tune it in a new run with model.pretrained={source}."
        )
    raise SetrainError(
        f"Checkpoint {source} does not fit this model ({'; '.join(problems)}); resume with "
        "the model, SE options and dataset it was trained with."
    )
