"""STL10 and CIFAR-10 through torchvision's own dataset classes.

torchvision checks the md5 of every extracted file, which refuses any correctly formatted copy
that is not byte-identical to the official one (a re-packed copy, or the small files the tests
write). The subclasses here keep the md5 check where it protects users, on the downloaded
archive, and only require the extracted files to be present; their format is checked by
parsing them, and a file that does not parse gets a clear error.
"""

import pickle
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from setrain.errors import SetrainError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)


def _presence_only(file_list: list) -> list:
    return [[name, None] for name, _ in file_list]


class CIFAR10Files(datasets.CIFAR10):
    """CIFAR-10's python-version batches; md5 verified on the downloaded archive only."""

    train_list = _presence_only(datasets.CIFAR10.train_list)
    test_list = _presence_only(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}


class STL10Files(datasets.STL10):
    """STL10's binary files (labelled splits); md5 verified on the downloaded archive only."""

    train_list = [[name, None] for name, _ in datasets.STL10.train_list if "unlabeled" not in name]
    test_list = _presence_only(datasets.STL10.test_list)


def _to_normalized_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _load(dataset_class, root: str, download: bool, description: str, folder: str, url: str, **kwargs):
    """Build a torchvision dataset, turning its download, missing-file and format errors into one sentence."""
    root = Path(root).absolute()
    expected = root / folder
    try:
        dataset = dataset_class(root, download=download, **kwargs)
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as error:
        reason = f"{type(error).__name__}: {error}"
        if download:
            raise SetrainError(
                f"Could not download {description} into {root} ({reason}); check the "
                f"internet connection, or download {url} yourself and extract it there."
            ) from error
        if isinstance(error, RuntimeError) and "not found" in str(error):
            raise SetrainError(
                f"{description} files not found in {expected}; set data.download=true to fetch "
                f"them (needs internet), or download {url} and extract it into {root}."
            ) from error
        raise SetrainError(
            f"Could not read {description} in {expected} ({reason}); the files are damaged or "
            f"not in the official format: replace them with a fresh copy of {url}."
        ) from error
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels
    if len(dataset.data) != len(labels):
        raise SetrainError(
            f"{description} files in {expected} are inconsistent ({len(dataset.data)} images but "
            f"{len(labels)} labels); replace them with a fresh copy of {url}."
        )
    return dataset


def build_cifar10(root: str = "datasets", download: bool = False) -> tuple[Dataset, Dataset, int]:
    """CIFAR-10 with the standard recipe: pad-4 random crop and horizontal flip for training."""
    train_transform = v2.Compose(
        [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        + _to_normalized_tensor(CIFAR10_MEAN, CIFAR10_STD)
    )
    val_transform = v2.Compose(_to_normalized_tensor(CIFAR10_MEAN, CIFAR10_STD))
    common = dict(
        description="CIFAR-10",
        folder=CIFAR10Files.base_folder,
        url=CIFAR10Files.url,
    )
    train = _load(CIFAR10Files, root, download, train=True, transform=train_transform, **common)
    val = _load(CIFAR10Files, root, False, train=False, transform=val_transform, **common)
    return train, val, 10


def build_stl10(
    root: str = "datasets", download: bool = False, image_size: int = 96
) -> tuple[Dataset, Dataset, int]:
    """STL10's labelled train (5,000) and test (8,000) splits at 96 px, optionally resized."""
    resize = [v2.Resize(image_size, antialias=True)] if image_size != 96 else []
    train_transform = v2.Compose(
        resize
        + [v2.RandomCrop(image_size, padding=image_size // 8), v2.RandomHorizontalFlip()]
        + _to_normalized_tensor(STL10_MEAN, STL10_STD)
    )
    val_transform = v2.Compose(resize + _to_normalized_tensor(STL10_MEAN, STL10_STD))
    common = dict(description="STL10", folder=STL10Files.base_folder, url=STL10Files.url)
    train = _load(STL10Files, root, download, split="train", transform=train_transform, **common)
    val = _load(STL10Files, root, False, split="test", transform=val_transform, **common)
    return train, val, 10
