"""Loader throughput (images/s) per dataset recipe and num_workers, beside training throughput.

    python scripts/bench_data.py              # a few minutes on 2 CPU cores
    python scripts/bench_data.py --no-write   # print the table only

Each dataset is written in its real on-disk format into a temporary folder (the writers of
setrain.testing; ImageNet-sized JPEGs for the imagenet recipe) and read through build_data,
the code training runs. Training throughput is forward + backward + SGD step of the model the
recipe trains, on random inputs of the same size, on this machine. The table replaces the
"## Data loading" section of docs/benchmarks.md and leaves any other section as it is.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from harness import BENCHMARKS, REPO, Trainee, cpu_name, write_section
from PIL import Image

from setrain.data import build_data
from setrain.models import create_model
from setrain.testing import write_cifar10, write_stl10

WORKERS = (0, 1, 2)
TARGET = 2.0  # the best loader at least twice as fast as training


class Recipe(NamedTuple):
    """A dataset recipe's loader (`batches` timed) and the model it trains (best of `steps`)."""

    dataset: str
    recipe: str  # the augmentation, as the table names it
    size: int  # px
    config: dict  # data config
    batches: int
    model: str
    model_size: int  # px
    model_batch: int
    steps: int


def write_photos(root: Path, classes: int, per_class: int, seed: int = 0) -> None:
    """ImageNet-like JPEGs in train/<wnid>/ and val/<wnid>/: 500x375 (the ILSVRC-2012 median size),
    smooth content plus grain, quality 90. Decoding cost depends on size and detail; noise overstates it."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
                    (500, 375), Image.BICUBIC
                )
                grain = rng.normal(0, 8, (375, 500, 3))
                pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)


def loader_images_per_s(config: dict, workers: int, batches: int, repeats: int = 2) -> float:
    """Steady-state images/s of the training loader, from the first batch on (worker start-up
    excluded); the best of `repeats` epochs, since other work on the machine only slows it."""
    data = build_data({**config, "num_workers": workers}, torch.device("cpu"))
    rates = []
    for repeat in range(repeats):
        data.shuffle_generator.manual_seed(repeat)
        iterator = iter(data.train_loader)
        next(iterator)
        seen, start = 0, time.perf_counter()
        for _, (images, _) in zip(range(batches), iterator):
            seen += len(images)
        rates.append(seen / (time.perf_counter() - start))
    return max(rates)


def training_images_per_s(model_name: str, image_size: int, batch_size: int, steps: int) -> float:
    batch = torch.randn(batch_size, 3, image_size, image_size), torch.randint(0, 10, (batch_size,))
    trainee = Trainee(lambda: create_model(model_name, num_classes=10), batch, torch.device("cpu"))
    trainee.step()  # warm-up: allocations, kernel selection
    return batch_size / min(trainee.seconds_per_step(1) for _ in range(steps))  # the least disturbed


def measure(folder: Path) -> list[dict]:
    write_cifar10(folder, train_per_batch=1000)
    write_stl10(folder, train_size=1200, test_size=10)
    write_photos(folder / "imagenet", classes=10, per_class=40)
    common = {"root": str(folder), "download": False}
    recipes = [
        Recipe("cifar10", "cifar (pad-4 crop, flip)", 32, {"name": "cifar10", **common, "batch_size": 128}, 30,
               "se_resnet20", 32, 64, 5),
        Recipe("stl10", "cifar (pad-12 crop, flip)", 96, {"name": "stl10", **common, "batch_size": 64}, 15,
               "se_resnet50", 96, 16, 3),
        Recipe("stl10", "resize, pad-28 crop, flip", 224,
               {"name": "stl10", **common, "image_size": 224, "batch_size": 32}, 10,
               "se_resnet50", 224, 8, 3),
        Recipe("imagenet", "imagenet (random-size crop, flip)", 224,
               {"name": "imagenet", "root": str(folder / "imagenet"), "image_size": 224, "batch_size": 32}, 10,
               "se_resnet50", 224, 8, 3),
    ]  # fmt: skip
    trained: dict[tuple, float] = {}
    rows = []
    for r in recipes:
        loader = {w: loader_images_per_s(r.config, w, r.batches) for w in WORKERS}
        key = (r.model, r.model_size)
        if key not in trained:
            trained[key] = training_images_per_s(r.model, r.model_size, r.model_batch, r.steps)
        ratio = max(loader.values()) / trained[key]
        rows.append(dict(dataset=r.dataset, recipe=r.recipe, size=r.size, loader=loader, model=r.model,
                         train=trained[key], ratio=ratio))  # fmt: skip
        print(f"{r.dataset} {r.size}px: loader {loader}, {r.model} trains {trained[key]:.1f} img/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    header = (
        "| dataset | recipe | px | "
        + " | ".join(f"loader img/s, num_workers={w}" for w in WORKERS)
        + " | model | training img/s | best loader / training | 2x target |\n"
        "|---|---|---|" + "---|" * len(WORKERS) + "---|---|---|---|\n"
    )
    lines = [
        f"| {r['dataset']} | {r['recipe']} | {r['size']} | "
        + " | ".join(f"{r['loader'][w]:,.0f}" for w in WORKERS)
        + f" | {r['model']} | {r['train']:,.1f} | {r['ratio']:,.1f}x"
        + f" | {'met' if r['ratio'] >= TARGET else 'NOT met'} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def section(rows: list[dict], load: tuple[float, float]) -> str:
    machine = (
        f"{cpu_name()}, no GPU used, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"1-minute load average {load[0]:.1f} before and {load[1]:.1f} after (other processes' share "
        "of the cores)"
    )
    return f"""## Data loading

Measured by `python scripts/bench_data.py` on {machine}.

Images/s of the training loader (decode, augment, collate; steady state, worker start-up
excluded, best of two epochs) for `data.num_workers` = 0, 1, 2, beside the images/s that training
the recipe's model consumes on the same machine (forward, backward and SGD step on random inputs
of that size; fastest of a few steps). The target is a loader at least 2x faster than training.

{table(rows)}
The datasets are written in their real formats: CIFAR-10's pickled batches, STL10's binary
files, and for the imagenet recipe 500x375 JPEGs (the ILSVRC-2012 median size, quality 90) in
the train/<wnid>/ layout; real photos hold more detail and decode more slowly. On this CPU-only
machine training is slow, so the ratio is large; the loader and training also share the same
cores, so each figure is an upper bound when both run, and other work on the machine moves them.
One worker is often slower than none on a quiet machine: the main process uses both cores'
threads and needs no copy between processes, while a worker runs one thread. But with other work
on the cores, the main process's multi-threaded resizing can collapse (tens of images/s in the
imagenet row in some runs), while workers, single-threaded, do not; and workers keep decoding
while the model trains. So the image datasets' configs default to 2 or more workers. On a GPU,
training consumes far more images/s (not measured here): a recipe needs about twice the GPU's
training rate divided by the `num_workers=1` rate worker processes, each on its own core.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(Path(folder))
    text = section(rows, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"Wrote {BENCHMARKS}")


if __name__ == "__main__":
    main()
