"""One training epoch and one evaluation pass: plain loops that read top to bottom."""

import math
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from setrain.errors import SetrainError

PROGRESS_EVERY_N_STEPS = 10  # the bar's numbers need a device sync; not every step


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the k highest logits, for each k."""
    max_k = min(max(ks), logits.shape[1])
    hits = logits.topk(max_k, dim=1).indices.eq(targets[:, None])
    return [hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks]


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    description: str,
) -> dict[str, float]:
    """Train for one pass over `loader`; returns mean loss, top-1 (%) and images per second."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    progress = tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=None)
    for step, (images, targets) in enumerate(progress):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        loss_sum += loss.detach() * len(targets)
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        seen += len(targets)
        if step % PROGRESS_EVERY_N_STEPS == 0:
            progress.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}",
                acc=f"{100 * correct.item() / seen:.1f}",
                lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                img_s=f"{seen / (time.perf_counter() - start):.0f}",
                refresh=False,
            )
    mean_loss = loss_sum.item() / seen
    if not math.isfinite(mean_loss):
        raise SetrainError(
            f"The training loss became {mean_loss} ({description}); lower the learning rate "
            "(optimizer.lr). The last good checkpoint was left untouched."
        )
    return {
        "loss": mean_loss,
        "top1": 100 * correct.item() / seen,
        "images_per_s": seen / (time.perf_counter() - start),
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    device: torch.device,
    description: str = "val",
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (%) over `loader`."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, targets in tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=None):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += criterion(logits, targets) * len(targets)
        hits1, hits5 = topk_correct(logits, targets, ks=(1, 5))
        top1 += hits1
        top5 += hits5
        seen += len(targets)
    return {
        "loss": loss_sum.item() / seen,
        "top1": 100 * top1.item() / seen,
        "top5": 100 * top5.item() / seen,
    }
