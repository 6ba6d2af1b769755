"""What TensorBoard shows: the run's curves (RunCurves), hyperparameters, SE gates, sample images."""

from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from setrain.errors import SetrainError
from setrain.models.se import se_blocks, stage_of

IMAGES_IN_GRID = 32


def hparams_of(cfg: DictConfig) -> dict[str, int | float | str | bool]:
    """Every setting of the run as a flat `group.key` table, the same columns for every run, so
    TensorBoard's HPARAMS tab lines up a sweep (e.g. over model.se.reduction) as one table."""
    flat = {}

    def visit(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix] = node
        else:  # lists and nulls: TensorBoard takes only numbers, strings and booleans
            flat[prefix] = str(node)

    visit("", OmegaConf.to_container(cfg, resolve=True))
    return flat


def add_hparams(writer: SummaryWriter, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Write the run's settings with its final metrics into the run's own event folder."""
    writer.add_hparams(hparams_of(cfg), {f"hparam/{key}": value for key, value in metrics.items()}, run_name=".")


@torch.inference_mode()
def add_excitation_histograms(writer: SummaryWriter, model: nn.Module, images: Tensor, epoch: int) -> None:
    """Histograms of the SE gates per stage on a fixed batch (paper Sec. 7): how they spread
    and saturate as training goes on. A plain network has none."""
    blocks = se_blocks(model)
    if not blocks:
        return
    gates: dict[str, list[Tensor]] = {}
    handles = [
        block.excitation.register_forward_hook(
            lambda module, inputs, gate, stage=stage_of(name): gates.setdefault(stage, []).append(gate.flatten().float().cpu())
        )
        for name, block in blocks.items()
    ]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for stage, values in gates.items():
        writer.add_histogram(f"excitation/{stage.replace(' ', '_')}", torch.cat(values), epoch)


def add_image_grid(writer: SummaryWriter, images: Tensor) -> None:
    """The first training batch as the network sees it (augmented; each image rescaled to 0..1)."""
    grid = make_grid(images[:IMAGES_IN_GRID].float().cpu(), nrow=8, normalize=True, scale_each=True)
    writer.add_image("train/batch", grid, 0)


class RunCurves:
    """The run's TensorBoard curves, in one place: rank 0 writes them, other processes call the
    same methods and nothing happens. A write that fails (a full disk, a read-only dir) stops the
    run with one sentence; the checkpoints written so far stay."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None):
        self.log_dir, self.writer = log_dir, None
        if enabled:
            with self._writing():
                self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    @contextmanager
    def _writing(self):
        try:
            yield
        except (OSError, RuntimeError) as error:
            self.writer = None  # closing it would raise again
            raise SetrainError(
                f"Could not write the TensorBoard curves in {self.log_dir} ({getattr(error, 'strerror', None) or error}); "
                f"free space or make it writable, then continue with resume=auto hydra.run.dir={self.log_dir.parent}."
            ) from error

    def sample_images(self, images: Tensor) -> None:
        if self.writer is not None:
            with self._writing():
                add_image_grid(self.writer, images)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.add_scalar("loss/train_step", loss, step)
                self.writer.add_scalar("lr/step", lr, step)

    def epoch(self, epoch: int, lr: float, train: dict, val: dict, model: nn.Module, gate_images: Tensor) -> None:
        """Train and val metrics (the EMA's as e.g. top1/val_ema, beside top1/val), lr, SE gates."""
        if self.writer is None:
            return
        with self._writing():
            for key, value in train.items():
                self.writer.add_scalar(f"{key}/train", value, epoch)
            for key, value in val.items():
                self.writer.add_scalar(f"{key.removeprefix('ema_')}/val{'_ema' * key.startswith('ema_')}", value, epoch)
            self.writer.add_scalar("lr", lr, epoch)
            add_excitation_histograms(self.writer, model, gate_images, epoch)
            self.writer.flush()

    def finish(self, cfg: DictConfig, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            with self._writing():
                add_hparams(self.writer, cfg, metrics)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.close()
