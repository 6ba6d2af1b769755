"""A finished run read back from its checkpoint: what setrain.analyze, evaluate and predict share.

The model is rebuilt from the checkpoint's own config and weights; the data is the checkpoint's
own data config, which `data=<file>` replaces and `+data.<key>=<value>` changes key by key.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from setrain.config_checks import check_data_options
from setrain.data import DataBundle, build_data
from setrain.engine.checkpoint import load_checkpoint, load_model_state
from setrain.errors import SetrainError
from setrain.models import build_model

WEIGHTS = ("auto", "model", "ema")


@dataclass
class TrainedModel:
    model: nn.Module
    checkpoint: Path
    config: dict
    """The run's resolved training config."""
    epoch: int
    weights: str
    """Which weights were loaded: "model" (the last optimizer step) or "ema" (their running average)."""
    num_classes: int

    @property
    def name(self) -> str:
        return self.config["model"]["name"]

    @property
    def provenance(self) -> dict:
        """What a command's results come from, for the head of its JSON file."""
        return dict(checkpoint=str(self.checkpoint), epoch=self.epoch, weights=self.weights, model=self.name)

    def output_dir(self, chosen: str | None, folder: str) -> Path:
        """`chosen`, or <run dir>/<folder>, the run dir being the parent of checkpoints/."""
        return Path(chosen) if chosen else self.checkpoint.parent.parent / folder


def choose_weights(state: dict, weights: str, checkpoint: Path) -> str:
    """`auto` takes the EMA weights where the run kept them (trainer.ema_decay): they usually
    validate better than the last step's."""
    if weights not in WEIGHTS:
        raise SetrainError(
            f"weights={weights} is not one of {', '.join(WEIGHTS)}; auto uses the EMA weights when "
            "the checkpoint has them."
        )
    has_ema = state.get("ema") is not None
    if weights == "auto":
        return "ema" if has_ema else "model"
    if weights == "ema" and not has_ema:
        raise SetrainError(
            f"Checkpoint {checkpoint} has no EMA weights (its run did not set trainer.ema_decay); use "
            "weights=model or weights=auto."
        )
    return weights


def load_trained_model(cfg: DictConfig, command: str) -> TrainedModel:
    """The model of `cfg.checkpoint` with the weights `cfg.weights` names, on the CPU.

    `checkpoint` may also be a run dir, as a run or a sweep's summary prints it: its
    checkpoints/best.pt. `command` ("analyze") ends the error sentence for a checkpoint that
    cannot be read.
    """
    fixes = (
        "pass checkpoint=<run dir>/checkpoints/best.pt of a finished run",
        f"{command} another one, such as checkpoints/last.pt",
    )
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise SetrainError(f"No checkpoint given; {fixes[0]}.")
    checkpoint = Path(cfg.checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoints" / "best.pt"
    state = load_checkpoint(checkpoint, fixes)
    weights = choose_weights(state, cfg.weights, checkpoint)
    num_classes = state[weights]["fc.weight"].shape[0]  # every family's classifier is `fc`
    model = build_model(state["config"]["model"], num_classes)
    load_model_state(model, state[weights], checkpoint)
    return TrainedModel(model, checkpoint, state["config"], state["epoch"], weights, num_classes)


def trained_data(
    trained: TrainedModel, data_cfg: DictConfig | None, device: torch.device
) -> tuple[DataBundle, DictConfig]:
    """The data to run `trained` on and its config: the checkpoint's own, unless `data_cfg` has a
    name (data=<file> replaces it); keys alone (+data.<key>=<value>) change the checkpoint's."""
    if data_cfg is None or "name" not in data_cfg:
        data_cfg = OmegaConf.merge(trained.config["data"], data_cfg or {})
    values = OmegaConf.to_container(data_cfg, resolve=True)
    check_data_options(values)
    data = build_data(values, device)
    if data.num_classes != trained.num_classes:
        raise SetrainError(
            f"The {data_cfg.name} data has {data.num_classes} classes but the checkpoint's classifier "
            f"has {trained.num_classes}; use the dataset the model was trained on."
        )
    return data, data_cfg
