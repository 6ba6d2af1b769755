"""Training speed of setrain's SE models against their plain twins and timm's equivalents.

    python scripts/bench_train.py            # prints the table, writes docs/benchmarks.md
    python scripts/bench_train.py --no-write --steps 5

All models run in one process, interleaved (A B C D, A B C D, ...), so a slow moment of a shared
machine hits them all alike; each figure is the median over rounds of the mean step time.
A step is forward, cross-entropy, backward and an SGD step on random inputs. Also measured:
CPU inference latency at batch 1 and 224 px. On CUDA (when there is one) bf16 autocast is added.
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn

from setrain.models import create_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Training speed"

# (label, builder): setrain models and the timm models with the same architecture.
IMAGENET_GROUP = [
    ("setrain se_resnet50", lambda: create_model("se_resnet50")),
    ("setrain resnet50", lambda: create_model("resnet50")),
    ("timm seresnet50", lambda: timm.create_model("seresnet50")),
    ("timm resnet50", lambda: timm.create_model("resnet50")),
]
CIFAR_GROUP = [
    ("setrain se_resnet20", lambda: create_model("se_resnet20")),
    ("setrain resnet20", lambda: create_model("resnet20")),
]


def train_step_time(model, batch, device, channels_last, autocast_dtype, steps):
    """Mean seconds per training step over `steps` steps (after the caller's warm-up)."""
    images, labels = batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def interleaved(group, measure, rounds):
    """Median over `rounds` of `measure(model)`, the models taking turns within each round."""
    times = {label: [] for label, _ in group}
    models = {label: build() for label, build in group}
    for label, model in models.items():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        measure(model)
    for _ in range(rounds):
        for label, model in models.items():
            times[label].append(measure(model))
    return {label: statistics.median(values) for label, values in times.items()}


def training_rows(group, size, batch_size, device, channels_last, autocast_dtype, steps, rounds):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch_size, 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch_size,), device=device)  # every model has >= 10 classes

    def measure(model):
        model.to(device, memory_format=memory_format).train()
        return train_step_time(model, (images, labels), device, channels_last, autocast_dtype, steps)

    return interleaved(group, measure, rounds)


def inference_latency(group, rounds, steps):
    """Median ms per image at batch 1, 224 px, eval mode, CPU, channels_last."""
    image = torch.randn(1, 3, 224, 224).to(memory_format=torch.channels_last)

    def measure(model):
        model.eval().to(memory_format=torch.channels_last)
        with torch.inference_mode():
            started = time.perf_counter()
            for _ in range(steps):
                model(image)
        return (time.perf_counter() - started) / steps

    return interleaved(group, measure, rounds)


def ratio_line(times, numerator, denominator, target):
    value = times[numerator] / times[denominator]
    verdict = "met" if value <= target else "not met"
    return f"| {numerator} / {denominator} | {value:.3f} | ≤ {target} | {verdict} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=96, help="ImageNet models' input size")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    settings = [("fp32", False, None), ("fp32 channels_last", True, None)]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        settings.append(("bf16 channels_last", True, torch.bfloat16))

    lines = [
        "| setting | model | input | ms / step | images/s |",
        "|---|---|---|---:|---:|",
    ]
    ratios = ["| ratio (train step time) | value | target | |", "|---|---:|---|---|"]
    for name, channels_last, autocast_dtype in settings:
        for group, size in ((IMAGENET_GROUP, args.size), (CIFAR_GROUP, 32)):
            times = training_rows(
                group, size, args.batch_size, device, channels_last, autocast_dtype, args.steps, args.rounds
            )
            for label, seconds in times.items():
                lines.append(
                    f"| {name} | {label} | {args.batch_size}x{size} px | {1000 * seconds:.1f} | "
                    f"{args.batch_size / seconds:.1f} |"
                )
                print(lines[-1], flush=True)
            if group is IMAGENET_GROUP:
                target_se = 1.05 if channels_last else 1.10
                ratios.append(ratio_line(times, "setrain se_resnet50", "setrain resnet50", target_se).replace("| setrain se", f"| {name}: setrain se", 1))
                ratios.append(ratio_line(times, "setrain se_resnet50", "timm seresnet50", 0.95).replace("| setrain se", f"| {name}: setrain se", 1))
                ratios.append(ratio_line(times, "timm seresnet50", "timm resnet50", 1.16).replace("| timm se", f"| {name}: timm se", 1))

    latency = inference_latency(IMAGENET_GROUP, args.rounds, steps=5)
    latency_lines = ["| model | ms / image |", "|---|---:|"] + [
        f"| {label} | {1000 * seconds:.1f} |" for label, seconds in latency.items()
    ]
    ratios.append(ratio_line(latency, "setrain se_resnet50", "setrain resnet50", 1.02).replace("| setrain se", "| CPU inference, batch 1, 224 px: setrain se", 1))

    load = os.getloadavg()[0]
    text = "\n".join([
        SECTION,
        "",
        f"Measured by `python scripts/bench_train.py` on {os.cpu_count()} CPU cores "
        f"({platform.machine()}), device {device}, torch {torch.__version__}, timm {timm.__version__}; "
        f"1-minute load average {load:.1f} at the end. Interleaved, median of {args.rounds} rounds of "
        f"{args.steps} steps, batch {args.batch_size}.",
        "",
        *lines,
        "",
        "CPU inference latency, batch 1, 224 px, channels_last, eval mode:",
        "",
        *latency_lines,
        "",
        *ratios,
        "",
    ])
    print(text)
    if not args.no_write:
        existing = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
        before, _, rest = existing.partition(SECTION)
        after = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
        DOCS.write_text(before.rstrip() + "\n\n" + text + ("\n" + after if after else ""))
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
