"""Seconds to write a training checkpoint: what the other processes wait at a step checkpoint.

    python scripts/bench_checkpoint.py                               # senet154 and se_resnet50, local temp dir
    python scripts/bench_checkpoint.py --models senet154 --dir /shared/runs --no-write

The checkpoint is the trainer's own (`checkpoint_of`: the weights, SGD's momentum after a step,
the scheduler, the run state), written by `save_checkpoint` (a temporary file, fsync, rename)
into --dir, which should be on the disk the runs write to. The table replaces the
"## Checkpoint writes" section of docs/benchmarks.md; README's "Checkpoints at scale" reads it.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import cpu_name, write_section
from torch import nn

from setrain.engine.checkpoint import RunState, Trainees, checkpoint_of, save_checkpoint
from setrain.engine.distributed import Processes
from setrain.engine.loop import StepSettings
from setrain.models import create_model


def trainer_checkpoint(name: str) -> tuple[dict, int]:
    """The checkpoint the trainer writes for `name` after a step of SGD with momentum, and the
    model's parameter count."""
    model = create_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates the momentum buffers
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    trainees = Trainees(model, optimizer, scheduler, StepSettings(nn.CrossEntropyLoss()))
    return checkpoint_of(trainees, RunState(), None, {}, Processes()), sum(p.numel() for p in model.parameters())


def write_seconds(checkpoint: dict, folder: Path, writes: int) -> list[float]:
    seconds = []
    for _ in range(writes):
        start = time.perf_counter()
        save_checkpoint(checkpoint, folder / "last.pt")
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["senet154", "se_resnet50"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--writes", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # writes share the disk and the cores with whatever else runs
    rows = ["| model | parameters | checkpoint | write: fastest | median |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for name in args.models:
            checkpoint, parameters = trainer_checkpoint(name)
            seconds = write_seconds(checkpoint, Path(folder), args.writes)
            size = (Path(folder) / "last.pt").stat().st_size / 1e6
            rows.append(
                f"| {name} | {parameters / 1e6:.1f}M | {size:,.0f} MB | {min(seconds):.2f} s | "
                f"{statistics.median(seconds):.2f} s |"
            )
            print(rows[-1], flush=True)
            del checkpoint
    where = "a temporary folder" if args.dir is None else f"`{args.dir}`"
    text = "\n".join([
        "## Checkpoint writes",
        "",
        f"`python scripts/bench_checkpoint.py`: the trainer's checkpoint written {args.writes} times by",
        f"`save_checkpoint` (temporary file, fsync, rename) into {where}, on {cpu_name()}, torch {torch.__version__},",
        f"load average {load:.1f} at the start.",
        "",
        *rows,
    ])  # fmt: skip
    if not args.no_write:
        write_section(text)
    print(text)


if __name__ == "__main__":
    main()
