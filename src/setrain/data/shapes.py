"""Shapes: a procedurally generated 10-class image dataset, made in memory so training works offline.

Each image holds one shape of a random size, position and colour on a random background with
Gaussian noise; the class is the shape alone, so a model has to learn form, not colour.
Generation is vectorised and seeded, so the same seed always gives the same images.
"""

import math

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from setrain.errors import SetrainError

CLASSES = (
    "disk", "ring", "square", "frame", "diamond",
    "triangle", "plus", "cross", "flower", "crescent",
)  # fmt: skip


def _shape_masks(labels: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean masks (N, H, W); u, v are pixel coordinates relative to the centre, in radii."""
    radius2 = u * u + v * v
    box = torch.maximum(u.abs(), v.abs())
    p, q = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
    angle = torch.atan2(v, u)
    masks = torch.stack(
        [
            radius2 <= 1.0,
            (radius2 <= 1.0) & (radius2 >= 0.5**2),
            box <= 0.75,
            (box <= 0.8) & (box >= 0.45),
            u.abs() + v.abs() <= 1.0,
            (v <= 0.6) & (u.abs() <= (v + 0.9) * 0.6),
            ((u.abs() <= 0.3) | (v.abs() <= 0.3)) & (box <= 0.9),
            ((p.abs() <= 0.3) | (q.abs() <= 0.3)) & (torch.maximum(p.abs(), q.abs()) <= 0.9),
            radius2.sqrt() <= 0.55 + 0.4 * torch.cos(5 * angle),
            (radius2 <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.75**2),
        ]
    )  # (classes, N, H, W)
    return masks.gather(0, labels.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def make_shapes(
    size: int, image_size: int, seed: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate `size` images as uint8 (N, 3, H, W) and balanced labels (N,), deterministically."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(size) % len(CLASSES))[torch.randperm(size, generator=generator)]
    pixel = torch.arange(image_size, dtype=torch.float32) + 0.5
    images = torch.empty(size, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, size, chunk):
        batch = labels[start : start + chunk]
        n = len(batch)
        radius = image_size * (0.12 + 0.18 * torch.rand(n, generator=generator))
        centre = radius[:, None] + torch.rand(n, 2, generator=generator) * (image_size - 2 * radius[:, None])
        u = (pixel.view(1, 1, -1) - centre[:, 0, None, None]) / radius[:, None, None]
        v = (pixel.view(1, -1, 1) - centre[:, 1, None, None]) / radius[:, None, None]
        u, v = torch.broadcast_tensors(u, v)
        mask = _shape_masks(batch, u, v).unsqueeze(1)
        background = torch.rand(n, 3, 1, 1, generator=generator)
        # Every channel differs from the background by 0.25..0.75, so the shape is always visible.
        foreground = (background + 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=generator)) % 1.0
        image = torch.where(mask, foreground, background)
        noise_level = 0.05 + 0.20 * torch.rand(n, 1, 1, 1, generator=generator)
        image = image + noise_level * torch.randn(image.shape, generator=generator)
        images[start : start + n] = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


class ShapesDataset(Dataset):
    """In-memory shapes images, returned as float tensors scaled to [-1, 1]."""

    classes = CLASSES
    # The same scaling for a decoded image file, (x / 255 - 0.5) / 0.5 (setrain.predict); the
    # in-memory images take the direct route below.
    transform = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.5,) * 3, (0.5,) * 3)]
    )

    def __init__(self, size: int, image_size: int, seed: int):
        self.images, self.targets = make_shapes(size, image_size, seed)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(127.5).sub_(1.0), int(self.targets[index])


def build_shapes(
    image_size: int = 32, train_size: int = 10000, val_size: int = 1000, seed: int = 0
) -> tuple[Dataset, Dataset, int]:
    """Train and validation sets from independent seeded streams (2*seed and 2*seed+1)."""
    if image_size < 8:
        raise SetrainError(f"data.image_size={image_size} is too small to draw shapes; use 16 or more.")
    train = ShapesDataset(train_size, image_size, 2 * seed)
    val = ShapesDataset(val_size, image_size, 2 * seed + 1)
    return train, val, len(CLASSES)
