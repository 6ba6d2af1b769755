"""Checkpoints: what a run saves to continue exactly, written atomically, read as data only
(``weights_only=True``), never as code.

The format is one dict: the state dicts of model, optimizer, scheduler, GradScaler (and EMA),
the `RunState` fields, this process's position and random state (and those of the other
processes under torchrun, in "other_ranks"), and the resolved config.
"""

import errno
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from setrain.engine.distributed import Processes, gather_object
from setrain.engine.loop import EpochTotals, StepSettings
from setrain.engine.runtime import rng_states
from setrain.errors import SetrainError
from setrain.files import load_torch_file, write_atomically
from setrain.models.resnet import renamed_from_sequential_layout

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch")


@dataclass
class RunState:
    """Where a run stands, and the one owner of it: what the trainer updates and a checkpoint keeps."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    stale_epochs: int = 0  # epochs since the best val top-1
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_top1": -1.0})
    metrics: dict = field(default_factory=dict)  # the last completed epoch's
    resumed_totals: EpochTotals | None = None  # progress inside epoch `epoch + 1` when resumed there
    resumed_rng: dict | None = None  # random states to restore once the resumed epoch's batches start

    def end_epoch(self, epoch: int, metrics: dict, val_record: dict) -> bool:
        """Record a finished epoch; True when its val top-1 is the best so far."""
        self.epoch, self.metrics = epoch, metrics
        is_best = val_record["val_top1"] > self.best["val_top1"]
        if is_best:
            self.best = {"epoch": epoch, **val_record}
        self.stale_epochs = 0 if is_best else self.stale_epochs + 1
        return is_best


@dataclass
class Trainees:
    """What training changes and a checkpoint restores besides the run state."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    step_settings: StepSettings


def checkpoint_of(trainees: Trainees, state: RunState, totals: EpochTotals | None, config: dict,
                  processes: Processes) -> dict | None:  # fmt: skip
    """Everything needed to continue after `state.epoch` epochs and, inside the next one, after the
    batches in `totals` (None at an epoch's end). Under torchrun every process calls it, as it
    gathers each one's position and random state; rank 0 gets the checkpoint, the others None."""
    cpu = torch.device("cpu")
    positions = gather_object(processes, {
        "epoch_progress": None if totals is None else vars(totals.to(cpu)),
        "rng": rng_states(),
    })  # fmt: skip
    if positions is None:
        return None
    ema = trainees.step_settings.ema
    return {
        "model": trainees.model.state_dict(),
        "optimizer": trainees.optimizer.state_dict(),
        "scheduler": trainees.scheduler.state_dict(),
        "scaler": trainees.step_settings.scaler.state_dict(),
        **({"ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged)} if ema is not None else {}),
        "epoch": state.epoch,
        **positions[0],  # epoch_progress and rng: rank 0's, or the only process's
        "other_ranks": positions[1:],
        "global_step": state.global_step,
        "stale_epochs": state.stale_epochs,
        "best": state.best,
        "metrics": state.metrics,
        "config": config,
    }


def restore(trainees: Trainees, checkpoint: dict, source: Path, processes: Processes, device: torch.device) -> RunState:
    """Load a checkpoint into the trainees; the run state to continue from."""
    load_model_state(trainees.model, checkpoint["model"], source)
    trainees.optimizer.load_state_dict(checkpoint["optimizer"])
    trainees.scheduler.load_state_dict(checkpoint["scheduler"])
    settings = trainees.step_settings
    if "scaler" in checkpoint:
        settings.scaler.load_state_dict(checkpoint["scaler"])
    if settings.ema is not None and "ema" in checkpoint:
        settings.ema.module.load_state_dict(checkpoint["ema"])
        settings.ema.n_averaged.fill_(checkpoint["ema_updates"])
    position = _position_of_this_process(checkpoint, processes)
    progress = position.get("epoch_progress")
    return RunState(
        epoch=checkpoint["epoch"], global_step=checkpoint.get("global_step", 0),
        stale_epochs=checkpoint.get("stale_epochs", 0), best=checkpoint["best"], metrics=checkpoint["metrics"],
        resumed_totals=EpochTotals(**progress).to(device) if progress else None, resumed_rng=position["rng"],
    )  # fmt: skip


def _position_of_this_process(checkpoint: dict, processes: Processes) -> dict:
    """This process's epoch progress and random state: its own when the checkpoint was saved by
    as many processes, rank 0's otherwise."""
    others = checkpoint.get("other_ranks", [])
    if len(others) != processes.world_size - 1:
        if processes.is_main:
            log.warning(
                "The checkpoint was saved by %d processes and %d continue it: each takes rank 0's "
                "random state, so the run goes on but not exactly as it would have.",
                len(others) + 1, processes.world_size,
            )  # fmt: skip
        return checkpoint
    return checkpoint if processes.rank == 0 else others[processes.rank - 1]


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically: a crash, or a disk that fills up, mid-write leaves the previous file intact.
    torch.save reports a full disk as a RuntimeError of its zip writer, not an OSError."""
    try:
        write_atomically(path, lambda file: torch.save(state, file))
    except (OSError, RuntimeError) as error:
        kept = f" (the previous {path.name} is intact)" if path.is_file() else ""
        resume = f"continue with resume=auto hydra.run.dir={path.parent.parent}"
        if getattr(error, "errno", None) == errno.ENOSPC or "failed writing" in str(error):
            raise SetrainError(
                f"The disk is full: could not write checkpoint {path}{kept}; free space on it, then {resume}."
            ) from error
        raise SetrainError(
            f"Could not write checkpoint {path} ({getattr(error, 'strerror', None) or error}){kept}; make "
            f"{path.parent} writable, then {resume}."
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
    for weights in ("model", "ema"):  # checkpoints written before the layers took torchvision's names
        if isinstance(state.get(weights), dict):
            state[weights] = renamed_from_sequential_layout(state[weights])
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
