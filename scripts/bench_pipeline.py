"""The trainer end to end against the training step alone: does the data pipeline keep up?

    python scripts/bench_pipeline.py --device cuda          # what scripts/gpu_check.sh runs
    python scripts/bench_pipeline.py --device cpu --tiny    # a dry run in a minute on a laptop

Each row runs `python train.py` with the row's overrides on datasets written in their real formats into --work (ImageNet-like 500x375
JPEGs, CIFAR-10 pickles, STL10 binaries), and reports the last epoch's images/s. Beside it,
the same model's training step alone (forward, backward, SGD) on a batch already on the device,
with the same precision, memory format and compile setting. The ratio is the share of the
step's speed the pipeline delivers; 1.0 means the device never waits for data.
"""

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from harness import REPO, Trainee
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from torchvision.io import decode_jpeg

from setrain.data import build_data
from setrain.data.on_device import EncodedFiles, decode_images
from setrain.engine.runtime import PRECISIONS, resolve_channels_last, resolve_precision
from setrain.models import create_model
from setrain.testing import write_cifar10, write_stl10


class Row(NamedTuple):
    label: str
    model: str
    overrides: tuple[str, ...]  # besides data root, device, epochs and the run dir
    step_alone: bool = True  # also time the model's step alone


def rows(tiny: bool) -> list[Row]:
    imagenet = ("data=imagenet", f"data.batch_size={16 if tiny else 256}", f"data.image_size={64 if tiny else 224}")
    cifar = ("data=cifar10", f"data.batch_size={16 if tiny else 512}")
    big, small = ("resnet20", "se_resnet20") if tiny else ("resnet50", "se_resnet50")
    return [
        Row("JPEGs, device pipeline", small, (*imagenet, "data.pipeline=device")),
        Row("JPEGs, device pipeline, decoded by workers", small, (*imagenet, "data.pipeline=device", "data.decode=workers"), step_alone=False),
        Row("JPEGs, workers (before)", small, (*imagenet, "data.pipeline=workers"), step_alone=False),
        Row("JPEGs, device pipeline", big, (*imagenet, "data.pipeline=device")),
        Row("JPEGs, device pipeline, compiled", small, (*imagenet, "data.pipeline=device", "trainer.compile=true")),
        Row("CIFAR-10, device pipeline", "se_resnet20", (*cifar, "data.pipeline=device")),
        Row("CIFAR-10, device pipeline", "senet18_cifar", (*cifar, "data.pipeline=device")),
        Row("STL10, defaults (auto)", small, ("data=stl10",), step_alone=False),
        Row("STL10, before (fp32, NCHW, workers)", small,
            ("data=stl10", "trainer.precision=32", "trainer.channels_last=false", "data.pipeline=workers"), step_alone=False),
    ]  # fmt: skip


def _write_jpegs(args: tuple[Path, int, int, int]) -> None:
    """One class folder of 500x375 JPEGs (the ILSVRC-2012 median size): smooth content plus grain."""
    folder, count, size, seed = args
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, np.float32) + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def write_datasets(work: Path, tiny: bool) -> None:
    """ImageNet-like tree, CIFAR-10 and STL10 in their official formats, unless already there."""
    classes, per_class, size = (4, 16, (160, 120)) if tiny else (100, 128, (500, 375))
    if not (work / "imagenet" / "val").is_dir():
        jobs = [(work / "imagenet" / split / f"n{c:08d}", count, size, c * 2 + (split == "val"))
                for split, count in (("train", per_class), ("val", max(2, per_class // 10))) for c in range(classes)]  # fmt: skip
        with multiprocessing.Pool() as pool:
            pool.map(_write_jpegs, jobs)
    if not (work / "cifar-10-batches-py").is_dir():
        write_cifar10(work, train_per_batch=64 if tiny else 10_000, test_size=64 if tiny else 10_000)
    if not (work / "stl10_binary").is_dir():
        write_stl10(work, train_size=64 if tiny else 5000, test_size=32 if tiny else 8000)


def end_to_end(row: Row, work: Path, device: str, epochs: int) -> tuple[float, DictConfig]:
    """The last epoch's training images/s of `python train.py ...`, and the config it ran."""
    root = work / "imagenet" if "data=imagenet" in row.overrides else work
    overrides = [f"model={row.model}", *row.overrides, f"data.root={root}", f"trainer.device={device}",
                 f"trainer.epochs={epochs}", "trainer.log_every_n_steps=1000"]  # fmt: skip
    if device == "cuda" and any(key in row.overrides for key in ("data.pipeline=workers", "data.decode=workers")):
        overrides.append(f"data.num_workers={max(1, multiprocessing.cpu_count() - 2)}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(finished.stderr[-1500:])
        results = json.loads((Path(run_dir) / "results.json").read_text())
    return results["final"]["train_images_per_s"], cfg


def pipeline_alone(work: Path, device: torch.device, tiny: bool) -> None:
    """Where a batch of JPEGs spends its time on the device pipeline, without a model: the whole
    pipeline, then batched decoding and the batch augmentation alone, and CPU decoding per core."""
    batch = 16 if tiny else 256
    config = {"name": "imagenet", "root": str(work / "imagenet"), "image_size": 64 if tiny else 224,
              "batch_size": batch, "num_workers": max(1, multiprocessing.cpu_count() - 2), "pipeline": "device"}  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for decode in ("device", "workers"):
        data = build_data({**config, "decode": decode}, device)
        data.set_epoch(0, 1)
        batches = data.train_batches()
        next(batches)  # the workers start
        start, seen = time.perf_counter(), 0
        for _, labels in batches:
            seen += len(labels)
        sync()
        print(f"pipeline alone, decode={decode}: {seen / (time.perf_counter() - start):,.0f} img/s", flush=True)
    files = EncodedFiles(data.train_loader.samples[:batch])
    encoded, paths = [files[i][0] for i in range(batch)], [files[i][2] for i in range(batch)]
    for name, work_once in (
        ("batched decode", lambda: decode_images(encoded, paths, device)),
        ("batch augmentation", lambda decoded=decode_images(encoded, paths, device): data.train_loader.transform(decoded, torch.Generator().manual_seed(0))),
        ("CPU decode, one core", lambda: [decode_jpeg(data) for data in encoded]),
    ):  # fmt: skip
        work_once()
        sync()
        start = time.perf_counter()
        for _ in range(3):
            work_once()
        sync()
        print(f"{name}: {3 * batch / (time.perf_counter() - start):,.0f} img/s", flush=True)


def step_alone(cfg, device: torch.device, steps: int) -> float:
    """Images/s of forward, backward and SGD step on one batch already on the device."""
    precision = resolve_precision(str(cfg.trainer.precision), device)
    memory_format = torch.channels_last if resolve_channels_last(cfg.trainer.channels_last, device) else torch.contiguous_format
    size, batch = cfg.data.image_size, cfg.data.batch_size
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), device=device)
    classes = 100 if cfg.data.name == "imagenet" else 10
    trainee = Trainee(
        lambda: create_model(cfg.model.name, num_classes=classes), (images, labels), device, memory_format,
        PRECISIONS[precision], compiled=bool(cfg.trainer.compile),
    )  # fmt: skip
    for _ in range(5):  # compiles, picks cuDNN algorithms
        trainee.step()
    return batch / trainee.seconds_per_step(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "setrain_bench_pipeline")
    parser.add_argument("--tiny", action="store_true", help="small models, images and datasets: a dry run")
    parser.add_argument("--only", help="'<run> / <model>' of the rows to run, separated by ;, e.g. 'JPEGs, device pipeline / se_resnet50'")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the pipeline-alone breakdown")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.device == "cuda"
    started = time.perf_counter()
    write_datasets(args.work, args.tiny)
    print(f"datasets in {args.work} ready after {time.perf_counter() - started:.0f} s", flush=True)
    if not args.no_breakdown:
        pipeline_alone(args.work, torch.device(args.device), args.tiny)
    print(f"| run | model | settings | end to end img/s | step alone img/s | ratio |\n|---|---|---|---:|---:|---:|")
    for row in rows(args.tiny):
        if args.only and not any(f"{row.label} / {row.model}" == part for part in args.only.split(";")):
            continue
        try:
            speed, cfg = end_to_end(row, args.work, args.device, epochs=2)
            alone = step_alone(cfg, torch.device(args.device), steps=3 if args.tiny else 30) if row.step_alone else None
        except Exception:  # a failed row is reported and the others still run
            print(f"| {row.label} | {row.model} | failed: {traceback.format_exc()[-1500:]} |", flush=True)
            continue
        device = torch.device(args.device)
        settings = (f"{resolve_precision(str(cfg.trainer.precision), device)}, "
                    f"{'NHWC' if resolve_channels_last(cfg.trainer.channels_last, device) else 'NCHW'}, "
                    f"batch {cfg.data.batch_size}, {cfg.data.image_size} px")  # fmt: skip
        ratio = f"{speed / alone:.2f}" if alone else "–"
        print(f"| {row.label} | {row.model} | {settings} | {speed:,.0f} | {f'{alone:,.0f}' if alone else '–'} | {ratio} |", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s on {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
