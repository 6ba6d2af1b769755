"""Augmentation recipes by name (`data.augment=<name>`), shared by every image dataset.

A dataset supplies its deterministic `base` steps, which bring one of its images to the model's
input size (nothing for CIFAR at 32 px; resize and centre crop for ImageNet). Validation uses
`base` alone; a recipe adds the random steps for training. Images become uint8 tensors first, as
torchvision recommends for v2 (its uint8 resize is the fast path), and floats only at the end.

A policy (`POLICIES`: trivialaugment, randaugment, autoaugment) follows the dataset's own crop
and flip, and random erasing (`data.random_erasing=<p>`) comes after normalisation, both in the
order of torchvision's classification reference (references/classification/presets.py).
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torchvision.transforms import InterpolationMode, v2

from setrain.errors import SetrainError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pad_crop_flip(image_size: int, base: list) -> list:
    """He et al. 2016 (sec. 4.2), CIFAR: pad 4 px (1/8 of 32), random 32 px crop, horizontal flip."""
    return [*base, v2.RandomCrop(image_size, padding=image_size // 8), v2.RandomHorizontalFlip()]


def random_resized_crop_flip(image_size: int, base: list) -> list:
    """SENet paper, TPAMI sec. 5.1 (after Szegedy et al. 2015): a crop of 8-100% of the area and
    aspect 3/4-4/3, resized to image_size, and flip. Works on any image size, so `base` is not needed."""
    return [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]


def flip(image_size: int, base: list) -> list:
    """Horizontal flip only."""
    return [*base, v2.RandomHorizontalFlip()]


def no_augmentation(image_size: int, base: list) -> list:
    """Train on exactly what validation sees."""
    return list(base)


AUGMENTATIONS: dict[str, Callable[[int, list], list]] = {
    "cifar": pad_crop_flip,
    "imagenet": random_resized_crop_flip,
    "flip": flip,
    "none": no_augmentation,
}


class Augmentation(NamedTuple):
    """A dataset's augmentation settings besides the recipe's name: the recipe of its own crop and
    flip, which a policy follows, its AutoAugment policy, and the config's data.randaugment_n,
    data.randaugment_m and data.random_erasing."""

    crop: str = "imagenet"
    autoaugment_policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.IMAGENET
    randaugment_n: int = 2
    randaugment_m: int = 9
    random_erasing: float = 0.0


# As torchvision's reference trains them (its --interpolation default); v2's own default is nearest.
BILINEAR = InterpolationMode.BILINEAR


def trivial_augment(settings: Augmentation) -> v2.Transform:
    """TrivialAugment (Müller & Hutter 2021): one operation of the wide space per image, at a
    uniformly drawn strength; nothing to tune."""
    return v2.TrivialAugmentWide(interpolation=BILINEAR)


def rand_augment(settings: Augmentation) -> v2.Transform:
    """RandAugment (Cubuk et al. 2020): data.randaugment_n operations per image, each at
    magnitude data.randaugment_m of 30; 2 and 9 are torchvision's defaults."""
    return v2.RandAugment(settings.randaugment_n, settings.randaugment_m, interpolation=BILINEAR)


def auto_augment(settings: Augmentation) -> v2.Transform:
    """AutoAugment (Cubuk et al. 2019): the sub-policies learnt on ImageNet, or on CIFAR-10 for
    the CIFAR datasets, which the paper also applies to CIFAR-100."""
    return v2.AutoAugment(settings.autoaugment_policy, interpolation=BILINEAR)


POLICIES: dict[str, Callable[[Augmentation], v2.Transform]] = {
    "trivialaugment": trivial_augment,
    "randaugment": rand_augment,
    "autoaugment": auto_augment,
}


def check_augmentation(augment: str, settings: Augmentation) -> None:
    """Refuse an unknown recipe, RandAugment settings outside torchvision's range or set for
    another recipe (they would do nothing), and an erasing probability outside [0, 1]."""
    if augment not in AUGMENTATIONS and augment not in POLICIES:
        names = ", ".join([*AUGMENTATIONS, *POLICIES])
        raise SetrainError(f"Unknown data.augment={augment!r}; choose one of: {names}.")
    n, m = settings.randaugment_n, settings.randaugment_m
    if n < 1 or not 0 <= m <= 30:
        raise SetrainError(
            f"data.randaugment_n={n} and data.randaugment_m={m} must be 1 or more and 0..30 "
            "(operations per image and their magnitude; torchvision's defaults are 2 and 9)."
        )
    defaults = Augmentation()
    if augment != "randaugment" and (n, m) != (defaults.randaugment_n, defaults.randaugment_m):
        raise SetrainError(
            f"data.randaugment_n={n} and data.randaugment_m={m} only act with data.augment=randaugment; "
            f"add it, or leave them at {defaults.randaugment_n} and {defaults.randaugment_m}."
        )
    if not 0 <= settings.random_erasing <= 1:
        raise SetrainError(
            f"data.random_erasing={settings.random_erasing} is a probability; use 0 (off) to 1, e.g. 0.25."
        )


def build_transforms(
    augment: str,
    image_size: int,
    base: list,
    mean: Sequence[float],
    std: Sequence[float],
    val_base: list | None = None,
    settings: Augmentation = Augmentation(),
) -> tuple[v2.Compose, v2.Compose]:
    """(train, val) transforms: recipe `augment` for training, `base` for validation, both normalised.

    `val_base` replaces `base` for validation when it is evaluated at another size (the paper
    evaluates SENet-154 on 320 px crops of a model trained on 224 px ones).
    """
    check_augmentation(augment, settings)
    if image_size < 8:
        raise SetrainError(f"data.image_size={image_size} is too small; use 16 or more.")
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment in POLICIES:
        steps = [*AUGMENTATIONS[settings.crop](image_size, base), POLICIES[augment](settings)]
    else:
        steps = AUGMENTATIONS[augment](image_size, base)
    erasing = [v2.RandomErasing(settings.random_erasing)] if settings.random_erasing else []
    train = v2.Compose([v2.ToImage(), *steps, *to_float, *erasing])
    val = v2.Compose([v2.ToImage(), *(base if val_base is None else val_base), *to_float])
    return train, val


def resize_to(image_size: int, native_size: int) -> list:
    """`base` for a dataset whose images all have one size: resize only when another size is asked for."""
    return [] if image_size == native_size else [v2.Resize(image_size, antialias=True)]


def resize_centre_crop(image_size: int, crop_fraction: float) -> list:
    """`base` for photos of any size: resize the short side to image_size / crop_fraction, crop the centre.

    crop_fraction 0.875 is the paper's evaluation (TPAMI sec. 5.1): resize to 256, centre crop 224.
    """
    if not 0 < crop_fraction <= 1:
        raise SetrainError(f"data.crop_fraction={crop_fraction} must be in (0, 1]; 0.875 crops 224 from 256.")
    return [v2.Resize(round(image_size / crop_fraction), antialias=True), v2.CenterCrop(image_size)]


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """MixUp (Zhang et al. 2018) and/or CutMix (Yun et al. 2019) on whole batches, applied by the
    training loop after loading (they mix images across a batch, so not per image); with both,
    one of the two per batch, as in torchvision's reference. None when both alphas are 0."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise SetrainError(
            f"trainer.mixup_alpha={mixup_alpha} and trainer.cutmix_alpha={cutmix_alpha} must be >= 0 "
            "(0 turns one off; 0.2 and 1.0 are usual)."
        )
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
