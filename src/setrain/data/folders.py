"""Image files in class folders: any ImageFolder tree (`folder`) and ILSVRC-2012 (`imagenet`).

Both go through torchvision's ImageFolder. What a user can get wrong about the files (a missing
folder, images outside class folders, an empty class, a link that loops or repeats a folder, an
image that does not decode) is reported as one sentence naming the path, also when it happens
inside a DataLoader worker.
"""

import copy
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset, random_split
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE, load_meta_file, parse_devkit_archive
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from setrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Augmentation, build_transforms, resize_centre_crop
from setrain.errors import SetrainError


def load_rgb(path: str) -> Image.Image:
    """torchvision's PIL loader, naming the file that does not decode instead of a worker traceback."""
    try:
        return datasets.folder.pil_loader(path)
    except UnidentifiedImageError as error:
        raise SetrainError(f"{path} is not an image file PIL can read; replace or delete it.") from error
    except OSError as error:
        raise SetrainError(
            f"Image {path} cannot be decoded ({error}); replace or delete the file."
        ) from error


def _check_classes(dataset: datasets.DatasetFolder, folder: Path) -> None:
    counts = torch.bincount(torch.tensor(dataset.targets, dtype=torch.long), minlength=len(dataset.classes))
    empty = [folder / name for name, count in zip(dataset.classes, counts.tolist()) if count == 0]
    if empty:
        raise SetrainError(
            f"Class folder {empty[0]} has no images ({', '.join(IMG_EXTENSIONS)}); add images or "
            "delete the folder."
        )


def _check_root(root: Path, description: str) -> None:
    if not root.is_dir():
        raise SetrainError(
            f"{description} folder {root} does not exist; set data.root to the folder that holds "
            "train/ and val/."
        )


def _check_links(folder: Path, seen: dict[str, str]) -> None:
    """ImageFolder follows links: a folder link back up the tree loops and gives its class every
    image; a link to a folder or image the trees already hold reads it twice, under another class
    or in both train/ and val/ (validating on training images). Walk the tree as ImageFolder does
    and refuse what is reached twice; `seen` (real path -> path) is shared by a dataset's trees.
    Links to folders and images found once, anywhere, are followed."""
    folders = [str(folder)]
    while folders:
        path = folders.pop()
        real = os.path.realpath(path)
        _reached(real, path, seen, "folder", "its images")
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda entry: entry.name, reverse=True):
                if entry.is_dir():
                    folders.append(entry.path)
                elif entry.name.lower().endswith(IMG_EXTENSIONS):  # no system call unless it is a link
                    real_file = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                    _reached(real_file, entry.path, seen, "image", "it")


def _reached(real: str, path: str, seen: dict[str, str], what: str, its: str) -> None:
    if real in seen:
        raise SetrainError(
            f"{seen[real]} and {path} are the same {what} through a symbolic link, so {its} would be read "
            "twice, possibly under another class or in both train/ and val/; remove the link, or copy "
            f"the {what} it should add."
        )
    seen[real] = path


def image_folder(folder: Path, transform, seen: dict[str, str]) -> datasets.ImageFolder:
    """ImageFolder over `folder`/<class>/<image>, refusing a missing folder, no classes, an empty
    class or a folder or image reached twice through links (also from the dataset's other trees,
    which share `seen`: see _check_links)."""
    if not folder.is_dir():
        raise SetrainError(
            f"{folder.parent} has no {folder.name}/ folder; put the images in {folder}/<class name>/."
        )
    _check_links(folder, seen)
    try:
        dataset = datasets.ImageFolder(folder, transform=transform, loader=load_rgb, allow_empty=True)
    except FileNotFoundError as error:  # torchvision: no class folder at all
        raise SetrainError(
            f"{folder} has no class folders; put each class's images in {folder}/<class name>/."
        ) from error
    _check_classes(dataset, folder)
    return dataset


def _same_classes(train: datasets.DatasetFolder, val: datasets.DatasetFolder, val_folder: Path) -> None:
    if val.classes != train.classes:
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        raise SetrainError(
            f"The class folders of {val_folder} differ from those of train/ (missing: "
            f"{', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'}); give both the same "
            "classes."
        )


def split_off_val(train: datasets.ImageFolder, val_transform, val_fraction: float, seed: int):
    """A seeded, disjoint split of one folder; the val part gets its own copy with the val transform."""
    if not 0 < val_fraction < 1:
        raise SetrainError(f"data.val_fraction={val_fraction} must be between 0 and 1, e.g. 0.1.")
    train_part, val_part = random_split(
        train, [1 - val_fraction, val_fraction], generator=torch.Generator().manual_seed(seed)
    )
    val = copy.copy(train)
    val.transform = val_transform
    return train_part, Subset(val, val_part.indices)


def _transforms(augment: str, image_size: int, val_image_size: int | None, crop_fraction: float, *policy_settings):
    """Train transform at image_size; val resized and centre-cropped to val_image_size (or image_size).
    A policy follows the random-size crop and flip, with ImageNet's AutoAugment policy."""
    base = resize_centre_crop(image_size, crop_fraction)
    val_base = resize_centre_crop(val_image_size or image_size, crop_fraction)
    settings = Augmentation("imagenet", v2.AutoAugmentPolicy.IMAGENET, *policy_settings)
    return build_transforms(augment, image_size, base, IMAGENET_MEAN, IMAGENET_STD, val_base, settings)


def build_folder(
    root: str,
    image_size: int = 224,
    val_image_size: int | None = None,
    crop_fraction: float = 0.875,
    augment: str = "imagenet",
    val_fraction: float = 0.0,
    seed: int = 0,
    randaugment_n: int = 2,
    randaugment_m: int = 9,
    random_erasing: float = 0.0,
) -> tuple[Dataset, Dataset, int]:
    """Any tree root/train/<class>/<image> with root/val/<class>/<image>, or val_fraction of train/."""
    root = Path(root).absolute()
    _check_root(root, "Dataset")
    train_transform, val_transform = _transforms(
        augment, image_size, val_image_size, crop_fraction, randaugment_n, randaugment_m, random_erasing
    )
    seen = {}  # what train/ and val/ hold, by real path
    train = image_folder(root / "train", train_transform, seen)
    has_val = (root / "val").is_dir()
    if val_fraction and has_val:
        raise SetrainError(
            f"{root} has a val/ folder and data.val_fraction={val_fraction} also asks to split one "
            "off train/; set data.val_fraction=0 to use val/, or remove val/."
        )
    if val_fraction:
        return *split_off_val(train, val_transform, val_fraction, seed), len(train.classes)
    if not has_val:
        raise SetrainError(
            f"{root} has no val/ folder; add root/val/<class>/<image>, or hold out part of train/ "
            "with data.val_fraction=0.1."
        )
    val = image_folder(root / "val", val_transform, seen)
    _same_classes(train, val, root / "val")
    return train, val, len(train.classes)


class DevkitVal(datasets.ImageFolder):
    """ILSVRC-2012 val images as extracted from ILSVRC2012_img_val.tar: one flat folder, labelled
    in file-name order by the devkit's ground truth (the wnid list torchvision stores in meta.bin)."""

    def __init__(self, folder: Path, wnids: list[str], classes: list[str], transform):
        self.wnids, self.train_classes = wnids, classes
        super().__init__(folder, transform=transform, loader=load_rgb)

    def find_classes(self, directory):
        return self.train_classes, {wnid: index for index, wnid in enumerate(self.train_classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        images = sorted(path for path in Path(directory).iterdir() if path.suffix.lower() in IMG_EXTENSIONS)
        if len(images) != len(self.wnids):
            raise SetrainError(
                f"{directory} holds {len(images)} images but the devkit labels {len(self.wnids)}; "
                "extract the complete ILSVRC2012_img_val.tar there."
            )
        unknown = sorted(set(self.wnids) - set(class_to_idx))
        if unknown:
            raise SetrainError(
                f"The devkit labels val images with {unknown[0]}, which has no folder in train/; "
                "extract the complete ILSVRC2012_img_train.tar there."
            )
        return [(str(path), class_to_idx[wnid]) for path, wnid in zip(images, self.wnids)]


def _devkit_val(root: Path, classes: list[str], transform) -> DevkitVal:
    """Flat val/ labelled by root/meta.bin, made from the devkit archive by torchvision if needed."""
    devkit = root / ARCHIVE_META["devkit"][0]
    if not (root / META_FILE).is_file():
        if not devkit.is_file():
            raise SetrainError(
                f"{root / 'val'} has images but no class folders, and neither {root / META_FILE} nor "
                f"{devkit} is there to label them; put the devkit archive in {root}."
            )
        name, md5 = ARCHIVE_META["devkit"]
        if not check_integrity(str(devkit), md5):
            raise SetrainError(f"{devkit} is not the official {name} (its md5 differs); download it again.")
        try:
            parse_devkit_archive(root)  # torchvision: reads the archive, writes meta.bin
        except ImportError as error:
            raise SetrainError(
                f"Reading {devkit} needs scipy, which torchvision uses for its .mat file; pip install scipy."
            ) from error
    try:
        val_wnids = load_meta_file(root)[1]
    except Exception as error:  # torch.load fails in many ways (struct, pickle, EOF) on a damaged file
        raise SetrainError(
            f"Could not read {root / META_FILE} ({type(error).__name__}); delete it so that it is made "
            f"again from {devkit}."
        ) from error
    return DevkitVal(root / "val", val_wnids, classes, transform)


def build_imagenet(
    root: str = "datasets/imagenet",
    image_size: int = 224,
    val_image_size: int | None = None,
    crop_fraction: float = 0.875,
    augment: str = "imagenet",
    randaugment_n: int = 2,
    randaugment_m: int = 9,
    random_erasing: float = 0.0,
) -> tuple[Dataset, Dataset, int]:
    """ILSVRC-2012: train/<wnid>/ and val/ either sorted into <wnid>/ folders or flat, as extracted,
    labelled by the devkit (ILSVRC2012_devkit_t12.tar.gz or torchvision's meta.bin) in root."""
    root = Path(root).absolute()
    _check_root(root, "ImageNet")
    if not (root / "train").is_dir():
        raise SetrainError(
            f"{root} has no train/ folder; extract ILSVRC2012_img_train.tar into {root / 'train'} and "
            "each class's .tar inside it into train/<wnid>/."
        )
    train_transform, val_transform = _transforms(
        augment, image_size, val_image_size, crop_fraction, randaugment_n, randaugment_m, random_erasing
    )
    seen = {}  # what train/ and val/ hold, by real path
    train = image_folder(root / "train", train_transform, seen)
    val_folder = root / "val"
    if not val_folder.is_dir():
        raise SetrainError(f"{root} has no val/ folder; extract ILSVRC2012_img_val.tar into {val_folder}.")
    if any(path.is_dir() for path in val_folder.iterdir()):
        val = image_folder(val_folder, val_transform, seen)
        _same_classes(train, val, val_folder)
    else:
        _check_links(val_folder, seen)
        val = _devkit_val(root, train.classes, val_transform)
    return train, val, len(train.classes)
