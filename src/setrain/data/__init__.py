"""Datasets by name and the loaders built from them.

Add a dataset by writing a builder ``build_<name>(...) -> (train_set, val_set, num_classes)``,
adding it to DATASETS below, and adding configs/data/<name>.yaml whose keys, besides the
loader settings (name, batch_size, num_workers), are the builder's arguments. Augmentation
recipes (`data.augment`) live in transforms.py. As in torchvision, the validation set's
`transform` turns a decoded image into the model's input (setrain.predict applies it to image
files) and its `classes`, where it has them, name the labels.
"""

import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from setrain.data.folders import build_folder, build_imagenet
from setrain.data.on_device import DeviceBatches, unbatched_steps
from setrain.data.sampling import RepeatedAugmentSampler
from setrain.data.shapes import build_shapes
from setrain.data.torchvision_sets import build_cifar10, build_cifar100, build_stl10
from setrain.errors import SetrainError

DATASETS = {
    "shapes": build_shapes,
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "stl10": build_stl10,
    "imagenet": build_imagenet,
    "folder": build_folder,
}

LOADER_KEYS = ("name", "batch_size", "num_workers", "pipeline", "decode", "repeated_augment")
PIPELINES = ("auto", "workers", "device")
DECODERS = ("device", "workers")

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train_loader: DataLoader | DeviceBatches
    val_loader: DataLoader | DeviceBatches
    num_classes: int
    shuffle_generator: torch.Generator
    val_transform: Callable
    """What validation does to one decoded image; setrain.predict applies it to image files."""
    classes: list[str] | None
    """Class names in label order, where the dataset has them (torchvision's `classes`)."""
    rank: int = 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Make the sample order and the workers' seeds depend only on (seed, epoch), so a
        resumed run sees the same batches; under torchrun, each process its own share of them."""
        epoch_seed = seed * 100_003 + epoch
        self.shuffle_generator.manual_seed(epoch_seed + self.rank)  # workers' augmentation seeds
        if isinstance(self.train_loader, DeviceBatches):
            self.train_loader.set_epoch(epoch_seed)
        elif isinstance(self.train_loader.sampler, (DistributedSampler, RepeatedAugmentSampler)):
            self.train_loader.sampler.set_epoch(epoch_seed)  # DistributedSampler adds its seed (0)

    def train_batches(self, start: int = 0) -> Iterator:
        """The current epoch's training batches from batch `start` on. Workers load the batches
        before `start` again, unused, which keeps their augmentation streams as in an uninterrupted
        epoch; the device pipeline's draws depend on the batch's index, so it skips them."""
        if isinstance(self.train_loader, DeviceBatches):
            return self.train_loader.batches(start)
        batches = iter(self.train_loader)
        for _ in range(start):
            next(batches)
        return batches


def build_data(data_cfg: dict, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Build train/val loaders from a data config such as configs/data/shapes.yaml.

    Under torchrun (`world_size` > 1) each process trains on its 1/world_size of every epoch
    (DistributedSampler) and validates on every world_size-th image, so the summed metrics
    count each validation image exactly once.

    `data.pipeline`: `workers` decode and augment each image in DataLoader processes; `device`
    does it for whole batches on the training device (on_device.py); `auto` is `device` on CUDA,
    unless the recipe has a step the device has no batched form for (a policy): then `workers`,
    said in the log. `data.repeated_augment=k` samples each image k times per epoch (sampling.py).
    Workers decode and augment; on CUDA, batches go to pinned memory for asynchronous copies.
    Workers are persistent only on CUDA. On the CPU, fresh workers each epoch draw their seeds
    from the generator the trainer reseeds per epoch, which keeps augmentation, and so a resumed
    run, bitwise identical to an uninterrupted one; persistent workers would keep the seeds drawn
    in the first epoch. On CUDA, runs are not bitwise reproducible anyway (cuDNN), and restarting
    many workers every epoch costs seconds, so there they stay; the sample order still follows
    (seed, epoch), only the augmentation stream of a resumed run differs.
    """
    name = data_cfg["name"]
    if name not in DATASETS:
        raise SetrainError(f"Unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}.")
    builder = DATASETS[name]
    options = {key: value for key, value in data_cfg.items() if key not in LOADER_KEYS}
    accepted = list(inspect.signature(builder).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SetrainError(
            f"Dataset {name!r} does not take the option(s) {', '.join(unknown)}; it takes: "
            f"{', '.join(accepted + list(LOADER_KEYS[1:]))}."
        )
    batch_size, num_workers = data_cfg["batch_size"], data_cfg["num_workers"]
    pipeline, decode = data_cfg.get("pipeline", "auto"), data_cfg.get("decode", "device")
    repeats = data_cfg.get("repeated_augment", 1)  # the loader values are checked in config_checks
    train_set, val_set, num_classes = builder(**options)
    if len(train_set) < batch_size:
        where = f" in {Path(data_cfg['root']).absolute()}" if "root" in data_cfg else ""
        raise SetrainError(
            f"The {name} training set{where} has {len(train_set)} images, fewer than one batch of "
            f"{batch_size}; lower data.batch_size or add images."
        )
    if len(val_set) == 0:
        raise SetrainError(
            f"The {name} validation set is empty; give it images (data.val_size for shapes, "
            "a larger data.val_fraction for folder)."
        )
    generator = torch.Generator()
    if _resolve_pipeline(pipeline, device, train_set, data_cfg) == "device":
        train_loader = DeviceBatches(train_set, batch_size, device, True, num_workers, rank, world_size, decode, repeats)
        val_loader = DeviceBatches(val_set, batch_size, device, False, num_workers, rank, world_size, decode)
        return _bundle(train_loader, val_loader, val_set, num_classes, generator, rank)
    on_cuda = device.type == "cuda"
    loader_options = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=on_cuda,
        persistent_workers=on_cuda and num_workers > 0,
    )
    sampler = None  # the DataLoader's own shuffle, from `generator`
    if repeats > 1:
        sampler = RepeatedAugmentSampler(len(train_set), repeats, rank, world_size)
    elif world_size > 1:
        sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, drop_last=True)
    # Full batches only in training: a last batch of one image would break BatchNorm.
    train_loader = DataLoader(
        train_set, sampler=sampler, shuffle=sampler is None, drop_last=True, generator=generator, **loader_options
    )
    if world_size > 1:
        val_set = Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = DataLoader(val_set, shuffle=False, **loader_options)
    return _bundle(train_loader, val_loader, val_set, num_classes, generator, rank)


def _resolve_pipeline(pipeline: str, device: torch.device, train_set, data_cfg: dict) -> str:
    """`auto` is `device` on CUDA when the device has a batched form of every training step, and
    otherwise `workers`, said in one log line; an explicit `device` is refused by BatchTransform."""
    if pipeline != "auto":
        return pipeline
    if device.type != "cuda":
        return "workers"
    while isinstance(train_set, Subset):
        train_set = train_set.dataset
    unsupported = unbatched_steps(train_set.transform)
    if unsupported:
        log.info(
            "data.pipeline=auto: data.augment=%s runs %s per image, which the device pipeline has no "
            "batched form for; loading with workers instead (data.num_workers=%d).",
            data_cfg.get("augment"), ", ".join(unsupported), data_cfg["num_workers"],
        )  # fmt: skip
        return "workers"
    return "device"


def _bundle(train_loader, val_loader, val_set, num_classes: int, generator, rank: int) -> DataBundle:
    val_images = val_set
    while isinstance(val_images, Subset):  # a held-out split, a process's share
        val_images = val_images.dataset
    classes = getattr(val_images, "classes", None)  # torchvision's names, where a dataset has them
    return DataBundle(
        train_loader, val_loader, num_classes, generator,
        val_transform=val_images.transform, classes=None if classes is None else list(classes), rank=rank,
    )  # fmt: skip
