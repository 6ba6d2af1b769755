"""The training steps of one epoch and one evaluation pass: plain loops that read top to bottom.

Mixed precision, gradient accumulation, clipping, MixUp/CutMix and the EMA are a few explicit
lines each, as in torchvision's reference `train_one_epoch`. The trainer (trainer.py) owns
everything around a step: logging, checkpoints, stopping.
"""

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from setrain.engine.distributed import Processes, sum_across


def topk_correct(logits: Tensor, targets: Tensor, ks=(1, 5)) -> list[Tensor]:
    """Number of samples whose target is among the k highest logits, for each k."""
    max_k = min(max(ks), logits.shape[1])
    hits = logits.topk(max_k, dim=1).indices.eq(targets[:, None])
    return [hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks]


@dataclass
class StepSettings:
    """How every training batch is processed (from cfg.trainer); evaluation uses the speed fields."""

    criterion: nn.Module
    autocast_dtype: torch.dtype | None = None  # None: float32
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    memory_format: torch.memory_format = torch.contiguous_format
    accumulate: int = 1
    clip_norm: float | None = None
    mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None  # MixUp/CutMix
    ema: AveragedModel | None = None

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


@dataclass
class EpochTotals:
    """Running sums of the epoch in progress; checkpointed, so a resumed epoch reports the same means."""

    batches: int = 0
    seen: int = 0
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros(()))
    correct: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    def to(self, device: torch.device) -> "EpochTotals":
        return EpochTotals(self.batches, self.seen, self.loss_sum.to(device), self.correct.to(device))


def train_steps(
    model: nn.Module,
    settings: StepSettings,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    num_batches: int,
    device: torch.device,
    totals: EpochTotals,
) -> Iterator[Tensor]:
    """Train on `batches`, the rest of an epoch of `num_batches`; yields the loss after each
    optimizer step, with `totals` updated in place. `model` may be wrapped (DDP, compiled)."""
    model.train()
    for images, targets in batches:
        images = images.to(device, non_blocking=True, memory_format=settings.memory_format)
        labels = targets.to(device, non_blocking=True)
        targets = labels
        if settings.mix is not None:
            images, targets = settings.mix(images, labels)  # soft targets, (N, num_classes)
        totals.batches += 1
        group_start = (totals.batches - 1) // settings.accumulate * settings.accumulate
        group_size = min(settings.accumulate, num_batches - group_start)
        steps_now = totals.batches == group_start + group_size
        # DDP averages gradients across processes only on the batch that ends a group.
        no_sync = isinstance(model, DistributedDataParallel) and not steps_now
        with model.no_sync() if no_sync else nullcontext():
            with settings.autocast(device):
                logits = model(images)
                loss = settings.criterion(logits, targets)
            settings.scaler.scale(loss / group_size).backward()

        loss = loss.detach()
        totals.loss_sum += loss.float() * len(labels)
        totals.correct += (logits.detach().argmax(dim=1) == labels).sum()
        totals.seen += len(labels)
        if steps_now:
            if settings.clip_norm is not None:
                settings.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
            settings.scaler.step(optimizer)
            settings.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if settings.ema is not None:
                settings.ema.update_parameters(model)
            yield loss


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    device: torch.device,
    description: str = "val",
    settings: StepSettings | None = None,
    processes: Processes = Processes(),
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (%) over `loader`, summed over all processes."""
    settings = settings or StepSettings(criterion)
    model.eval()
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    progress = tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=None if processes.is_main else True)
    for images, targets in progress:
        images = images.to(device, non_blocking=True, memory_format=settings.memory_format)
        targets = targets.to(device, non_blocking=True)
        with settings.autocast(device):
            logits = model(images)
        loss_sum += criterion(logits.float(), targets) * len(targets)
        hits1, hits5 = topk_correct(logits, targets, ks=(1, 5))
        top1 += hits1
        top5 += hits5
        seen += len(targets)
    loss_sum, top1, top5, seen = (value.item() for value in sum_across(processes, loss_sum, top1, top5, seen))
    return {"loss": loss_sum / seen, "top1": 100 * top1 / seen, "top5": 100 * top5 / seen}
