"""CIFAR-10, CIFAR-100 and STL10 through torchvision's own dataset classes.

torchvision checks the md5 of every extracted file, which refuses any correctly formatted copy
that is not byte-identical to the official one (a re-packed copy, or the small files the tests
write). The subclasses here keep the md5 check where it protects users, on the downloaded
archive, and only require the extracted files to be present; their format is checked by
parsing them, and a file that does not parse gets a clear error. Without the md5 a data folder is
untrusted input, like a checkpoint: CIFAR's pickled batches are read by an unpickler that only
rebuilds arrays (files.DataOnlyUnpickler), so a crafted one is refused instead of running code.
Each subclass also carries what one shared builder needs: its name, native image size,
training-set mean/std, AutoAugment policy and split arguments.
"""

import pickle
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets import cifar

from torchvision.transforms.v2 import AutoAugmentPolicy

from setrain.data.transforms import Augmentation, build_transforms, resize_to
from setrain.errors import SetrainError
from setrain.files import CodeInPickle, load_data_pickle


def _presence_only(file_list: list) -> list:
    return [[name, None] for name, _ in file_list]


class CIFAR10Files(datasets.CIFAR10):
    """CIFAR-10's python-version batches; md5 verified on the downloaded archive only."""

    train_list = _presence_only(datasets.CIFAR10.train_list)
    test_list = _presence_only(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}
    description, native_size = "CIFAR-10", 32
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    autoaugment_policy = AutoAugmentPolicy.CIFAR10
    split_arguments = {"train": True}, {"train": False}


class CIFAR100Files(datasets.CIFAR100):
    """CIFAR-100's python-version files (fine labels); md5 verified on the downloaded archive only."""

    train_list = _presence_only(datasets.CIFAR100.train_list)
    test_list = _presence_only(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}
    description, native_size = "CIFAR-100", 32
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    autoaugment_policy = AutoAugmentPolicy.CIFAR10  # the AutoAugment paper's choice for CIFAR-100
    split_arguments = {"train": True}, {"train": False}


class STL10Files(datasets.STL10):
    """STL10's binary files (labelled splits); md5 verified on the downloaded archive only."""

    train_list = [[name, None] for name, _ in datasets.STL10.train_list if "unlabeled" not in name]
    test_list = _presence_only(datasets.STL10.test_list)
    # torchvision reads the names from class_names.txt, and has none without it.
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    description, native_size = "STL10", 96
    mean, std = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
    autoaugment_policy = AutoAugmentPolicy.IMAGENET  # photos of ImageNet's kind, not tiny images
    split_arguments = {"split": "train"}, {"split": "test"}


@contextmanager
def _data_only_pickles():
    """torchvision's CIFAR reads its files with `pickle.load`, which calls whatever a file names:
    while a dataset is built, its `pickle` is one that refuses to (load_data_pickle)."""
    cifar.pickle = SimpleNamespace(load=load_data_pickle)
    try:
        yield
    finally:
        cifar.pickle = pickle


def _load(dataset_class, root: Path, download: bool, description: str, **kwargs):
    """Build a torchvision dataset, turning its download, missing-file and format errors into one sentence."""
    expected, url = root / dataset_class.base_folder, dataset_class.url
    try:
        with _data_only_pickles():
            dataset = dataset_class(root, download=download, **kwargs)
    except CodeInPickle as error:
        raise SetrainError(
            f"{description} file {error.path} holds pickled Python code ({error.call}), which the "
            f"official files do not, so it is not read; replace it with a fresh copy of {url}."
        ) from error
    except (RuntimeError, OSError, ValueError, TypeError, EOFError, KeyError, pickle.UnpicklingError) as error:
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
    labels = np.asarray(dataset.labels if labels is None else labels)
    if len(dataset.data) != len(labels):
        raise SetrainError(
            f"{description} files in {expected} are inconsistent ({len(dataset.data)} images but "
            f"{len(labels)} labels); replace them with a fresh copy of {url}."
        )
    last = len(dataset.classes) - 1
    if len(labels) and (labels.min() < 0 or labels.max() > last):
        raise SetrainError(
            f"{description} files in {expected} hold labels {labels.min()}..{labels.max()}, outside its "
            f"classes 0..{last}; replace them with a fresh copy of {url}."
        )
    return dataset


def _build(dataset_class, root: str, download: bool, image_size: int, augment: str, *policy_settings):
    """Train and val sets of one official-file dataset; only the training split downloads.
    A policy follows the CIFAR crop and flip, as do these datasets' own recipes."""
    train_transform, val_transform = build_transforms(
        augment,
        image_size,
        resize_to(image_size, dataset_class.native_size),
        dataset_class.mean,
        dataset_class.std,
        settings=Augmentation("cifar", dataset_class.autoaugment_policy, *policy_settings),
    )
    root, description = Path(root).absolute(), dataset_class.description
    train_split, val_split = dataset_class.split_arguments
    train = _load(dataset_class, root, download, description, transform=train_transform, **train_split)
    val = _load(dataset_class, root, False, description, transform=val_transform, **val_split)
    return train, val, len(train.classes)


def build_cifar10(
    root: str = "datasets",
    download: bool = False,
    image_size: int = 32,
    augment: str = "cifar",
    randaugment_n: int = 2,
    randaugment_m: int = 9,
    random_erasing: float = 0.0,
) -> tuple[Dataset, Dataset, int]:
    """CIFAR-10: 50,000 training and 10,000 test images of 32 px in 10 classes."""
    return _build(CIFAR10Files, root, download, image_size, augment, randaugment_n, randaugment_m, random_erasing)


def build_cifar100(
    root: str = "datasets",
    download: bool = False,
    image_size: int = 32,
    augment: str = "cifar",
    randaugment_n: int = 2,
    randaugment_m: int = 9,
    random_erasing: float = 0.0,
) -> tuple[Dataset, Dataset, int]:
    """CIFAR-100: the same images and loader as CIFAR-10, with 100 fine-grained classes."""
    return _build(CIFAR100Files, root, download, image_size, augment, randaugment_n, randaugment_m, random_erasing)


def build_stl10(
    root: str = "datasets",
    download: bool = False,
    image_size: int = 96,
    augment: str = "cifar",
    randaugment_n: int = 2,
    randaugment_m: int = 9,
    random_erasing: float = 0.0,
) -> tuple[Dataset, Dataset, int]:
    """STL10's labelled train (5,000) and test (8,000) splits at 96 px, optionally resized.

    The unlabelled split (100,000 images) is not loaded: training here is supervised.
    """
    return _build(STL10Files, root, download, image_size, augment, randaugment_n, randaugment_m, random_erasing)
