"""Writers of small datasets in the official on-disk formats: the tests load them through the code
users run, and the scripts time loaders on them (bench_data.py) or break them on purpose
(reliability_table.py). In the package, as numpy.testing is, so that tests and scripts import it
alike and neither imports the other; nothing in setrain itself imports it."""

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_cifar10(root: Path, train_per_batch: int = 8, test_size: int = 16, seed: int = 0) -> Path:
    """cifar-10-batches-py/: five pickled training batches, a test batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        size = test_size if name == "test_batch" else train_per_batch
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, (size, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, size).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(size)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    label_names = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": label_names}))
    return folder


def write_stl10(root: Path, train_size: int = 20, test_size: int = 10, seed: int = 0) -> Path:
    """stl10_binary/: uint8 images (N, 3, 96, 96) stored column-major, labels 1..10."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("test", test_size)):
        rng.integers(0, 256, (size, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        rng.integers(1, 11, size, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text(
        "\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"])
    )
    return folder


def write_cifar100(root: Path, train_size: int = 40, test_size: int = 16, seed: int = 0) -> Path:
    """cifar-100-python/: pickled `train` and `test` with fine and coarse labels, and `meta`."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in (("train", train_size), ("test", test_size)):
        fine = rng.integers(0, 100, size).tolist()
        batch = {
            "filenames": [f"{name}_{i}.png" for i in range(size)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [label // 5 for label in fine],
            "data": rng.integers(0, 256, (size, 3 * 32 * 32), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """An RGB image of size (width, height) in the format its suffix names (.png, .jpg, .JPEG)."""
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_image_folder(
    folder: Path, classes: list[str], per_class: int, seed: int = 0, suffixes=(".png", ".jpg")
) -> Path:
    """folder/<class>/<image>: images of varied sizes, alternating the suffixes (PNG and JPEG)."""
    rng = np.random.default_rng(seed)
    for class_name in classes:
        for i in range(per_class):
            size = (int(rng.integers(40, 80)), int(rng.integers(40, 80)))
            write_image(folder / class_name / f"{class_name}_{i}{suffixes[i % len(suffixes)]}", rng, size)
    return folder


IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(
    root: Path, train_per_class: int = 6, val_per_class: int = 2, devkit: bool = False
) -> Path:
    """ILSVRC-2012 as extracted: train/<wnid>/<wnid>_<i>.JPEG, and val/ either in <wnid>/ folders
    or (devkit=True) flat ILSVRC2012_val_<8 digits>.JPEG labelled by torchvision's meta.bin,
    which holds what its parse_devkit_archive reads from the devkit: (wnid -> class names, val wnids)."""
    rng = np.random.default_rng(0)
    for wnid in IMAGENET_WNIDS:
        for i in range(train_per_class):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", rng, (80, 60))
    val_wnids = [wnid for _ in range(val_per_class) for wnid in IMAGENET_WNIDS]
    for number, wnid in enumerate(val_wnids, start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        write_image(root / "val" / (name if devkit else f"{wnid}/{name}"), rng, (60, 80))
    if devkit:
        wnid_to_classes = {wnid: (f"class {wnid}",) for wnid in IMAGENET_WNIDS}
        torch.save((wnid_to_classes, val_wnids), root / "meta.bin")
    return root
