"""CIFAR-10, CIFAR-100 and STL10 through torchvision's own dataset classes.

torchvision checks the md5 of every extracted file, which refuses any correctly formatted copy
that is not byte-identical to the official one (a re-packed copy, or the small files the tests
write). The subclasses here keep the md5 check where it protects users, on the downloaded
archive, and only require the extracted files to be present; their format is checked by
parsing them, and a file that does not parse gets a clear error.
"""

import pickle
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets

from setrain.data.transforms import build_transforms, resize_to
from setrain.errors import SetrainError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)


def _presence_only(file_list: list) -> list:
    return [[name, None] for name, _ in file_list]


class CIFAR10Files(datasets.CIFAR10):
    """CIFAR-10's python-version batches; md5 verified on the downloaded archive only."""

    train_list = _presence_only(datasets.CIFAR10.train_list)
    test_list = _presence_only(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}


class CIFAR100Files(datasets.CIFAR100):
    """CIFAR-100's python-version files (fine labels); md5 verified on the downloaded archive only."""

    train_list = _presence_only(datasets.CIFAR100.train_list)
    test_list = _presence_only(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}


class STL10Files(datasets.STL10):
    """STL10's binary files (labelled splits); md5 verified on the downloaded archive only."""

    train_list = [[name, None] for name, _ in datasets.STL10.train_list if "unlabeled" not in name]
    test_list = _presence_only(datasets.STL10.test_list)


def _load(dataset_class, root: Path, download: bool, description: str, **kwargs):
    """Build a torchvision dataset, turning its download, missing-file and format errors into one sentence."""
    expected, url = root / dataset_class.base_folder, dataset_class.url
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


def _build(
    dataset_class, description: str, native_size: int, mean, std, train_split: dict, val_split: dict,
    root: str, download: bool, image_size: int, augment: str,
) -> tuple[Dataset, Dataset, int]:  # fmt: skip
    """Train and val sets of one official-file dataset; only the training split downloads."""
    train_transform, val_transform = build_transforms(
        augment, image_size, resize_to(image_size, native_size), mean, std
    )
    root = Path(root).absolute()
    train = _load(dataset_class, root, download, description, transform=train_transform, **train_split)
    val = _load(dataset_class, root, False, description, transform=val_transform, **val_split)
    return train, val, len(train.classes)


def build_cifar10(
    root: str = "datasets", download: bool = False, image_size: int = 32, augment: str = "cifar"
) -> tuple[Dataset, Dataset, int]:
    """CIFAR-10: 50,000 training and 10,000 test images of 32 px in 10 classes."""
    splits = dict(train_split={"train": True}, val_split={"train": False})
    return _build(CIFAR10Files, "CIFAR-10", 32, CIFAR10_MEAN, CIFAR10_STD, **splits,
                  root=root, download=download, image_size=image_size, augment=augment)  # fmt: skip


def build_cifar100(
    root: str = "datasets", download: bool = False, image_size: int = 32, augment: str = "cifar"
) -> tuple[Dataset, Dataset, int]:
    """CIFAR-100: the same images and loader as CIFAR-10, with 100 fine-grained classes."""
    splits = dict(train_split={"train": True}, val_split={"train": False})
    return _build(CIFAR100Files, "CIFAR-100", 32, CIFAR100_MEAN, CIFAR100_STD, **splits,
                  root=root, download=download, image_size=image_size, augment=augment)  # fmt: skip


def build_stl10(
    root: str = "datasets", download: bool = False, image_size: int = 96, augment: str = "cifar"
) -> tuple[Dataset, Dataset, int]:
    """STL10's labelled train (5,000) and test (8,000) splits at 96 px, optionally resized.

    The unlabelled split (100,000 images) is not loaded: training here is supervised.
    """
    splits = dict(train_split={"split": "train"}, val_split={"split": "test"})
    return _build(STL10Files, "STL10", 96, STL10_MEAN, STL10_STD, **splits,
                  root=root, download=download, image_size=image_size, augment=augment)  # fmt: skip
