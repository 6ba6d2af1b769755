"""What the bench scripts share: a model taking timed training steps, rounds that take turns and
wait for an idle CPU, ratios of the fastest rounds, and the docs section they rewrite.

Other processes on a shared machine only ever slow a measurement down, so every figure is the
fastest of several (as `timeit` advises), with the median beside it where it is reported.
"""

import ctypes
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "docs" / "benchmarks.md"


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of the machine's CPU time spent busy over `interval` seconds (Linux /proc/stat)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total, idle = read()
    time.sleep(interval)
    total_after, idle_after = read()
    return 1 - (idle_after - idle) / max(1, total_after - total)


def wait_until_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """Wait until other processes leave the CPU idle (or `max_wait` s pass); the busy fraction seen."""
    if not Path("/proc/stat").exists() or max_wait <= 0:
        return float("nan")
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def interleaved(measures: dict, rounds: int, quiet_wait: float, busy_seen: list[float]) -> dict[str, list[float]]:
    """`rounds` values of each measure, the measures taking turns within each round, so that a slow
    moment of the machine hits them all alike; each round first waits up to `quiet_wait` s for an
    idle CPU and appends the busy share it started on to `busy_seen`. Each round starts with the
    next measure (A B C, B C A, C A B, ...): the first after the wait runs on a CPU that has idled,
    and would otherwise always be the same one.

    The first round is a warm-up (allocator, oneDNN/cuDNN kernel choice) and is not kept."""
    values = {label: [] for label in measures}
    labels = list(measures)
    for round_index in range(rounds + 1):
        if round_index > 0:
            busy_seen.append(wait_until_quiet(quiet_wait))
        start = round_index % len(labels)
        for label in labels[start:] + labels[:start]:
            value = measures[label]()
            if round_index > 0:
                values[label].append(value)
    return values


class Ratio(NamedTuple):
    """Of two models' times: that of their fastest rounds (the least disturbed ones), and the
    median and range of the ratio taken within each round (the spread)."""

    best: float
    median: float
    low: float
    high: float


def ratio(values: dict, numerator: str, denominator: str) -> Ratio:
    per_round = [a / b for a, b in zip(values[numerator], values[denominator])]
    best = min(values[numerator]) / min(values[denominator])
    return Ratio(best, statistics.median(per_round), min(per_round), max(per_round))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Trainee:
    """A model with its optimizer and a fixed random batch, ready to take training steps: forward,
    cross-entropy, backward and an SGD step."""

    def __init__(self, build, batch, device, memory_format=torch.contiguous_format, autocast_dtype=None, compiled=False):
        model = build().to(device, memory_format=memory_format).train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.model = torch.compile(model) if compiled else model
        self.images, self.labels = batch
        self.device, self.autocast_dtype = device, autocast_dtype
        self.criterion = nn.CrossEntropyLoss()
        self.page_faults = []  # minor page faults per step, per measurement

    def step(self) -> None:
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            loss = self.criterion(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def seconds_per_step(self, steps: int) -> float:
        synchronize(self.device)
        faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        seconds = (time.perf_counter() - started) / steps
        self.page_faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)
        return seconds

    def flops_per_step(self) -> int:
        """Conv and matmul FLOPs of one step, forward and backward (elementwise ops not counted)."""
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()

    def peak_memory_mb(self) -> float:
        """Memory one step needs above what the process held before it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        if not Path("/proc/self/clear_refs").exists():
            return float("nan")
        release_freed_memory()
        before = status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size, VmHWM
        self.step()
        return status_mb("VmHWM") - before


def status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(key))
    return int(line.split()[1]) / 1024


def release_freed_memory() -> None:
    """Give the memory glibc keeps from freed tensors back to the OS (malloc_trim), so that a step
    reusing it shows in the resident set size again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak then misses reused memory
        pass


def cpu_name() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"


def write_section(text: str, path: Path = BENCHMARKS) -> None:
    """Put `text`, a `## ` section, in place of the section of the same heading in `path` (or at
    its end). The old section's `### ` subsections stay after the new text: they are notes written
    by hand on what the figures show. The other sections stay as they are."""
    heading = text.splitlines()[0]
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    before, found, rest = existing.partition(heading + "\n")
    end = rest.find("\n## ")
    section, after = (rest[:end], rest[end + 1 :]) if found and end >= 0 else (rest if found else "", "")
    notes = section[section.find("\n### ") + 1 :].rstrip() + "\n" if "\n### " in section else ""
    parts = [before.rstrip() + "\n\n" + text.rstrip() + "\n", notes, after]
    path.write_text("\n".join(part for part in parts if part).rstrip() + "\n")
