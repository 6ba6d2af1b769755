"""Writers of tiny datasets in the official on-disk formats, so tests load them as users' files."""

import pickle
from pathlib import Path

import numpy as np


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
