"""Checkpoints: written atomically, read as data only (``weights_only=True``), never as code."""

import os
from pathlib import Path

import torch
from torch import nn

from setrain.errors import SetrainError
from setrain.files import load_torch_file

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


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
    """Load weights, naming the keys and shapes that differ rather than failing deep in torch."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise SetrainError(
            f"Checkpoint {source} does not fit this model ({'; '.join(problems)}); resume with "
            "the model, SE options and dataset it was trained with."
        )
    model.load_state_dict(state_dict)
