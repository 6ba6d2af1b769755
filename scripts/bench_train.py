"""Training speed of setrain's SE models, fused and unfused, against their plain twins and timm's.

    python scripts/bench_train.py   # about 10 minutes on 2 idle CPU cores; writes docs/benchmarks.md
    python scripts/bench_train.py --no-write --rounds 3 --skip-startup
    python scripts/bench_train.py --profile  # where the step time goes, op by op (one thread)
    python scripts/bench_train.py --compile  # adds every model under torch.compile (inductor)
    PYTHONPATH=src python3 scripts/bench_train.py --device cuda --fused-check  # GPU, no hydra needed

Groups of five models: setrain's SE model with its SE tail fused (`model.se.fused=true`) and
unfused, its plain twin, timm's SE model and timm's twin. `resnet50`: SE-ResNet-50 (96 px on the
CPU); `cifar`: the CIFAR SENet-18 beside timm's (se)resnet18 given the same 3x3 stem (32 px);
`resnext50`: SE-ResNeXt-50 (`--groups`). The models of a group run in one process, interleaved
(A B C D E, A B C D E, ...), so a slow moment of a shared machine hits them all alike, and on
the CPU each round first waits (up to --quiet-wait seconds) until the CPU is idle. Other processes only slow a round down, so figures
are from each model's fastest round (as `timeit` advises), with the median beside them; a ratio
is that of the fastest rounds, with the median and range of the ratio within each round. A step
is forward, cross-entropy, backward and an SGD step on random inputs. Measured per model: ms per
step, images/s, peak memory of a step, and the FLOP/s reached (conv and matmul FLOPs counted by
torch.utils.flop_counter; the model FLOP utilisation against the GPU's peak when there is one).
Also on the CPU: inference latency at batch 1 and 224 px, and the time from `python train.py`
(default config) to its first training step. `--device cuda` measures bf16 autocast,
channels_last, batch 256 and 224 px instead. `--compile` adds channels_last settings in which
every model is compiled by torch.compile's default inductor backend (as `trainer.compile=true`);
its compilation happens in the warm-up round, which is not kept. On the CPU, malloc keeps freed
memory for reuse, as setrain's trainer sets it (`trainer.keep_freed_memory`); `--default-malloc`
measures without that. `--fused-check` is the fused-SE comparison alone (the resnet50 group,
eager and compiled, timm eager only; no inference, start-up or docs): a few minutes on a GPU.
"""

import argparse
import ctypes
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import timm
import torch
from timm.layers import SEModule
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from setrain.models import create_model

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Training speed"

# timm's SE width is C/16 rounded up to a multiple of 8; rd_divisor=1 gives the paper's C//16,
# which is setrain's (for ResNet-50 both are the same).
TIMM_SE = dict(block_args=dict(attn_layer=partial(SEModule, rd_divisor=1)))


def timm_cifar(name: str, **kwargs) -> nn.Module:
    """timm's ResNet-18 with the CIFAR stem of setrain's senet18_cifar: a 3x3 stride-1 conv, no max pool."""
    model = timm.create_model(name, num_classes=10, **kwargs)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def setrain_pair(name: str) -> list[tuple[str, object]]:
    """setrain's SE model with its SE tail fused and unfused."""
    return [
        (f"setrain {name}, fused", lambda: create_model(name, fused=True)),
        (f"setrain {name}", lambda: create_model(name, fused=False)),
    ]


# name: (title, input size, [(label, builder)]): setrain's SE model fused and unfused, its twin,
# timm's SE model, timm's twin.
GROUPS = {
    "resnet50": ("SE-ResNet-50", None, setrain_pair("se_resnet50") + [
        ("setrain resnet50", lambda: create_model("resnet50")),
        ("timm seresnet50", lambda: timm.create_model("seresnet50")),
        ("timm resnet50", lambda: timm.create_model("resnet50")),
    ]),
    "cifar": ("SENet-18 (CIFAR)", 32, setrain_pair("senet18_cifar") + [
        ("setrain resnet18_cifar", lambda: create_model("resnet18_cifar")),
        ("timm seresnet18, CIFAR stem", lambda: timm_cifar("resnet18", **TIMM_SE)),
        ("timm resnet18, CIFAR stem", lambda: timm_cifar("resnet18")),
    ]),
    "resnext50": ("SE-ResNeXt-50", None, setrain_pair("se_resnext50_32x4d") + [
        ("setrain resnext50_32x4d", lambda: create_model("resnext50_32x4d")),
        ("timm seresnext50_32x4d", lambda: timm.create_model("seresnext50_32x4d")),
        ("timm resnext50_32x4d", lambda: timm.create_model("resnext50_32x4d")),
    ]),
}  # fmt: skip

# Targets of SE-ResNet-50 per (device, compiled), issue 17: the fused model's time over its
# twin's ("overhead", channels_last), over timm's SE model ("timm"), peak memory over the twin's.
TARGETS = {
    ("cpu", False): dict(overhead=1.05, timm=0.95),
    ("cpu", True): dict(overhead=1.05, timm=0.95),
    ("cuda", False): dict(overhead=1.10, timm=0.80, memory=1.10),  # timm: >= 1.25x its images/s
    ("cuda", True): dict(overhead=1.08, memory=1.10),
}

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the MFU.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}

# Run by the startup measurement: train.py itself, stopped at the first forward of any module.
STARTUP_PROBE = """
import os, runpy, sys, time
import hydra, setrain.cli  # what train.py imports first
print("mark imported", time.time(), flush=True)
import torch
def first_step(module, args):
    print("mark first-step", time.time(), flush=True)
    os._exit(0)
torch.nn.modules.module.register_module_forward_pre_hook(first_step)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Trainee:
    """A model with its optimizer and a fixed random batch, ready to take training steps."""

    def __init__(self, build, batch, device, memory_format, autocast_dtype, compiled):
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


# The CPU busy fraction (other processes' share) seen at the start of each round, for the report.
busy_at_round_start: list[float] = []


def interleaved(measures: dict, rounds: int, quiet_wait: float) -> dict[str, list[float]]:
    """`rounds` values of each measure, the measures taking turns within each round.

    The first round is a warm-up (allocator, oneDNN/cuDNN kernel choice) and is not kept."""
    values = {label: [] for label in measures}
    for round_index in range(rounds + 1):
        if round_index > 0:
            busy_at_round_start.append(wait_until_quiet(quiet_wait))
        for label, measure in measures.items():
            value = measure()
            if round_index > 0:
                values[label].append(value)
    return values


def ratio(values: dict, numerator: str, denominator: str) -> tuple[float, float, float, float]:
    """The ratio of the two models' fastest rounds, and the median, min and max of the ratio
    taken within each round. Other processes only ever slow a round down, so the fastest round is
    the least disturbed one (as in `timeit`); the per-round ratios show the spread."""
    per_round = [a / b for a, b in zip(values[numerator], values[denominator])]
    best = min(values[numerator]) / min(values[denominator])
    return best, statistics.median(per_round), min(per_round), max(per_round)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def trainees(group, size, args, device, setting) -> dict[str, Trainee]:
    _, channels_last, autocast_dtype, compiled = setting
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(args.batch_size, 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)  # every model has >= 10 classes
    return {
        label: Trainee(build, (images, labels), device, memory_format, autocast_dtype, compiled)
        for label, build in group
    }


def step_times(group, size, args, device, setting) -> tuple[dict[str, list[float]], dict[str, float], dict]:
    """Seconds per training step of each model of a group, per round; its median page faults per
    step (minor faults: the OS giving the process fresh, zeroed memory); and the trainees, for
    `step_figures` once all timings are done (it gives freed memory back to the OS, after which
    the next timings would fault again)."""
    models = trainees(group, size, args, device, setting)
    times = interleaved(
        {label: partial(t.seconds_per_step, args.steps) for label, t in models.items()},
        args.rounds, args.quiet_wait,
    )  # fmt: skip
    for label, values in times.items():
        print(f"{setting[0]}, {label}: {', '.join(f'{1000 * v:.0f}' for v in values)} ms", flush=True)
    faults = {label: statistics.median(t.page_faults[1:]) for label, t in models.items()}  # no warm-up
    return times, faults, models


def step_figures(models: dict[str, Trainee]) -> dict[str, tuple[float, int]]:
    """Peak memory (MiB) and FLOPs of one more training step of each model, one after another."""
    return {label: (t.peak_memory_mb(), t.flops_per_step()) for label, t in models.items()}


def inference_times(group, args) -> dict[str, list[float]]:
    """Seconds per image of batch-1, 224 px CPU inference (eval mode, channels_last), per round;
    with `--compile` also of each model compiled by inductor with freezing (weights folded into
    the graph as constants, BatchNorm into the convolutions), compiled before the rounds."""
    image = torch.randn(1, 3, 224, 224).to(memory_format=torch.channels_last)
    models = {label: build().eval().to(memory_format=torch.channels_last) for label, build in group}
    if args.compile:
        # For the rest of the process; it only changes graphs compiled without autograd. Given in
        # torch.compile's options or patched around the compiling call it did not take (30 ms, not
        # 21), nor without the reset after the training settings' compilations.
        torch._inductor.config.freezing = True
        torch._dynamo.reset()
        for label, model in list(models.items()):
            compiled = torch.compile(model)
            with torch.inference_mode():
                compiled(image)
            models[f"{label}, compiled"] = compiled

    def latency(model, steps=5):
        with torch.inference_mode():
            started = time.perf_counter()
            for _ in range(steps):
                model(image)
        return (time.perf_counter() - started) / steps

    return interleaved(
        {label: partial(latency, model) for label, model in models.items()}, args.rounds, args.quiet_wait
    )


def startup(runs: int, quiet_wait: float) -> dict:
    """Seconds from starting `python train.py trainer.device=cpu` (default config) to the imports
    done and to its first training step: per run, the median taken by the caller."""
    results = {"imports": [], "first step": []}
    with tempfile.TemporaryDirectory() as run_dir:
        for run in range(runs):
            wait_until_quiet(quiet_wait)
            started = time.time()
            output = subprocess.run(
                [sys.executable, "-c", STARTUP_PROBE, "trainer.device=cpu", f"hydra.run.dir={run_dir}/{run}"],
                cwd=REPO, capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            mark_lines = (line.split() for line in output.splitlines() if line.startswith("mark "))
            marks = {name: float(seconds) for _, name, seconds in mark_lines}
            results["imports"].append(float(marks["imported"]) - started)
            results["first step"].append(float(marks["first-step"]) - started)
    return results


def op_profile(group, args, device, threads: int = 1, rows: int = 16) -> str:
    """A markdown table of self CPU time (ms per step, median over `args.rounds` interleaved
    steps) and calls per step of the ops that take the most time, per model of `group`, in fp32
    channels_last, from torch.profiler. One thread: op times then add up to the step's CPU time,
    and suffer less from other processes than multi-threaded wall time does."""
    torch.set_num_threads(threads)
    setting = ("fp32 channels_last", True, None, False)
    models = trainees(group, args.size, args, device, setting)
    samples = {label: [] for label in models}  # per model, per round: {op: (self ms, calls)}
    for trainee in models.values():
        trainee.step()  # warm-up
    for _ in range(args.rounds):
        wait_until_quiet(args.quiet_wait)
        for label, trainee in models.items():
            with torch.profiler.profile() as profiler:
                trainee.step()
            samples[label].append(
                {e.key: (e.self_cpu_time_total / 1000, e.count) for e in profiler.key_averages()}
            )

    def median_op(label, key) -> tuple[float, int]:
        values = [ops.get(key, (0.0, 0)) for ops in samples[label]]
        return statistics.median(ms for ms, _ in values), max(calls for _, calls in values)

    keys = {key for rounds in samples.values() for ops in rounds for key in ops}
    ordered = sorted(keys, key=lambda key: -max(median_op(label, key)[0] for label in models))
    lines = [
        "| op | " + " | ".join(f"{label}: ms, calls" for label in models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for key in ordered[:rows]:
        cells = (median_op(label, key) for label in models)
        lines.append(f"| {key} | " + " | ".join(f"{ms:.1f}, {calls}" for ms, calls in cells) + " |")
    totals = (statistics.median(sum(ms for ms, _ in ops.values()) for ops in r) for r in samples.values())
    lines.append("| all ops (median step) | " + " | ".join(f"{ms:.1f}" for ms in totals) + " |")
    return "\n".join(lines)


def ratio_row(what: str, values: dict, numerator: str, denominator: str, target: float | None) -> str:
    best, median, low, high = ratio(values, numerator, denominator)
    verdict = "" if target is None else ("met" if best <= target else "not met")
    target_text = "—" if target is None else f"≤ {target}"
    return (
        f"| {what}: {numerator} / {denominator} | {best:.3f} | {median:.3f} | {low:.3f}–{high:.3f} "
        f"| {target_text} | {verdict} |"
    )


def write_section(text: str) -> None:
    """Replace the measured part of the section in docs/benchmarks.md: its ### subsections (the
    notes on what the profile shows) and the other sections stay."""
    existing = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    before, _, rest = existing.partition(SECTION)
    end = rest.find("\n## ")
    section, after = (rest[:end], rest[end + 1:]) if end >= 0 else (rest, "")
    notes = section[section.find("\n### ") + 1:].rstrip() + "\n" if "\n### " in section else ""
    DOCS.write_text(
        before.rstrip() + "\n\n" + text + ("\n" + notes if notes else "") + ("\n" + after if after else "")
    )


def memory_row(what: str, memory: dict, numerator: str, denominator: str, target: float | None) -> str:
    value = memory[numerator] / memory[denominator]
    verdict = "" if target is None else ("met" if value <= target else "not met")
    target_text = "—" if target is None else f"≤ {target}"
    return f"| {what}: {numerator} / {denominator} | {value:.3f} | | | {target_text} | {verdict} |"


def group_ratios(name: str, key: str, labels: list, seconds: dict, memory: dict, setting, device) -> list[str]:
    """The ratio rows of one group in one setting, against the targets where the issue sets them."""
    fused, se, twin, timm_se, timm_twin = labels
    _, channels_last, _, compiled = setting
    targets = TARGETS[(device.type, compiled)] if key == "resnet50" else {}
    overhead = targets.get("overhead") if channels_last else None
    rows = [
        ratio_row(f"{name}, SE overhead, fused", seconds, fused, twin, overhead),
        ratio_row(f"{name}, SE overhead, unfused", seconds, se, twin, None),
        ratio_row(f"{name}, fused / unfused", seconds, fused, se, None),
    ]  # fmt: skip
    if timm_se in seconds:
        rows += [
            ratio_row(f"{name}, against timm", seconds, fused, timm_se, targets.get("timm")),
            ratio_row(f"{name}, timm's SE overhead", seconds, timm_se, timm_twin, None),
            ratio_row(f"{name}, plain twins", seconds, twin, timm_twin, None),
        ]
    rows.append(memory_row(f"{name}, peak memory", memory, fused, twin, targets.get("memory")))
    rows.append(memory_row(f"{name}, peak memory", memory, se, twin, None))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per model")
    parser.add_argument("--batch-size", type=int, help="default: 32 on the CPU, 256 on CUDA")
    parser.add_argument(
        "--size", type=int, help="the ImageNet models' input size; default: 96 on the CPU, 224 on CUDA"
    )
    parser.add_argument("--groups", help=f"comma-separated, of: {', '.join(GROUPS)} (default: resnet50,cifar)")
    parser.add_argument(
        "--quiet-wait", type=float, default=15, help="most seconds to wait for an idle CPU per round (CPU only)"
    )
    parser.add_argument("--startup-runs", type=int, default=5)
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="leave glibc's malloc as it is (by default it keeps freed memory, as setrain's CPU training does)",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="also measure every model compiled by torch.compile (inductor), in channels_last",
    )  # fmt: skip
    parser.add_argument(
        "--fused-check", action="store_true",
        help="the fused-SE comparison alone: SE-ResNet-50 fused and unfused, its twin and timm's, "
        "channels_last, eager and compiled (timm eager only); prints, writes nothing",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="print the op-level CPU profile of the SE-ResNet-50 group (one thread) and stop",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.size = args.size or (224 if cuda else 96)
    args.groups = (args.groups or ("resnet50" if args.fused_check else "resnet50,cifar")).split(",")
    if args.fused_check:
        args.compile = args.skip_startup = args.no_write = True
    if cuda:
        args.quiet_wait, args.skip_startup = 0, True
    return args


def settings_of(args, device: torch.device) -> list[tuple]:
    """(name, channels_last, autocast dtype, compiled) of each setting measured."""
    if device.type == "cuda":
        settings = [("bf16 channels_last", True, torch.bfloat16, False)]
    else:
        settings = [("fp32", False, None, False), ("fp32 channels_last", True, None, False)]
    if args.fused_check:
        settings = [setting for setting in settings if setting[1]]
    if args.compile:
        settings += [(f"{name}, compiled", True, dtype, True) for name, cl, dtype, _ in settings if cl]
    return settings


def measured_models(args, setting) -> dict[str, tuple]:
    """The groups as measured in a setting: `--fused-check` compiles setrain's models only."""
    compiled = setting[3]
    return {
        key: (title, size, [m for m in models if not (args.fused_check and compiled and "timm" in m[0])])
        for key, (title, size, models) in GROUPS.items() if key in args.groups
    }  # fmt: skip


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    kept_freed_memory = False
    if device.type == "cpu" and not args.default_malloc:
        from setrain.engine.runtime import keep_freed_memory  # imports the trainer, and hydra

        kept_freed_memory = keep_freed_memory()
    if args.profile:
        print(op_profile(GROUPS["resnet50"][2], args, torch.device("cpu")))
        return
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = settings_of(args, device)

    # On the CPU, timings of every setting first, then peak memory and FLOPs from one more step of
    # each model (measuring memory gives freed memory back to the OS); on CUDA, each setting's
    # figures and rows as soon as it is timed, so a run stopped early still reports.
    measured = {}
    for setting in settings:
        for key, (_, size, group) in measured_models(args, setting).items():
            measured[setting, key] = step_times(group, size or args.size, args, device, setting)
            if device.type == "cuda":
                measured[setting, key] = figures_and_rows(args, device, setting, key, *measured[setting, key])
                print("\n".join(measured[setting, key][0] + measured[setting, key][1]), flush=True)
    inference = device.type == "cpu" and not args.fused_check and "resnet50" in args.groups
    latency = inference_times(GROUPS["resnet50"][2], args) if inference else {}
    seconds_to_start = None if args.skip_startup else startup(args.startup_runs, args.quiet_wait)

    lines = [
        "| setting | model | input | ms / step, fastest round | median | images/s | peak MiB | GFLOP/s "
        "| MFU | page faults / step |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    ratios = [
        "| ratio | fastest rounds | per round: median | range | target | |",
        "|---|---:|---:|---|---|---|",
    ]
    for (setting, key), result in measured.items():
        if device.type == "cpu":
            result = figures_and_rows(args, device, setting, key, *result)
        rows, group_ratio_rows = result
        lines += rows
        ratios += group_ratio_rows
    text = report(args, device, kept_freed_memory, lines, ratios, latency, seconds_to_start)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote {DOCS}")


def figures_and_rows(args, device, setting, key, seconds, faults, models) -> tuple[list[str], list[str]]:
    """A group's table rows and ratio rows in one setting, after one more step of each model for
    its peak memory and FLOPs."""
    name, _, autocast_dtype, _ = setting
    title, size, _ = GROUPS[key]
    size = size or args.size
    peak_tf = peak_tflops(device) if autocast_dtype is not None else None
    figures = step_figures(models)
    rows = []
    for label, (memory, flops) in figures.items():
        fastest, median = min(seconds[label]), statistics.median(seconds[label])
        tflops = flops / fastest / 1e12
        utilisation = f"{100 * tflops / peak_tf:.1f}%" if peak_tf else "n/a"
        rows.append(
            f"| {name} | {label} | {args.batch_size}x{size} px | {1000 * fastest:.1f} | "
            f"{1000 * median:.1f} | {args.batch_size / fastest:.1f} | {memory:,.0f} | "
            f"{1000 * tflops:,.0f} | {utilisation} | {faults[label]:,.0f} |"
        )
    labels = [label for label, _ in GROUPS[key][2]]
    memory = {label: figure[0] for label, figure in figures.items()}
    return rows, group_ratios(f"{name}, {title}", key, labels, seconds, memory, setting, device)


def report(args, device, kept_freed_memory, lines, ratios, latency, seconds_to_start) -> str:
    """The section of docs/benchmarks.md: how it was measured, the tables, the ratios."""
    latency_rows = [
        f"| {label} | {1000 * min(times):.1f} | {1000 * statistics.median(times):.1f} |"
        for label, times in latency.items()
    ]
    if latency:
        fused, se, twin, timm_se, _ = (label for label, _ in GROUPS["resnet50"][2])
        for suffix in ("", ", compiled") if args.compile else ("",):
            what = f"CPU inference, batch 1, 224 px{suffix}"
            ratios.append(ratio_row(f"{what}, SE overhead, fused", latency, fused + suffix, twin + suffix, 1.02))
            ratios.append(ratio_row(f"{what}, SE overhead, unfused", latency, se + suffix, twin + suffix, None))
            ratios.append(ratio_row(f"{what}, against timm", latency, fused + suffix, timm_se + suffix, None))
    load = os.getloadavg()[0]
    busy = busy_at_round_start or [float("nan")]
    quiet = sum(b <= 0.2 for b in busy)
    where = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} and {where}"
    inference_table = [
        "CPU inference latency, batch 1, 224 px, channels_last, eval mode:",
        "",
        "| model | ms / image, fastest round | median |",
        "|---|---:|---:|",
        *latency_rows,
        "",
    ]
    return "\n".join([
        SECTION,
        "",
        f"Measured by `python scripts/bench_train.py` on {where}, device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; 1-minute load average {load:.1f} at the end. Interleaved, "
        f"{args.rounds} rounds of {args.steps} steps, batch {args.batch_size}; each round "
        f"waited up to {args.quiet_wait:.0f} s for an idle CPU; {quiet} of {len(busy)} rounds "
        f"started on one (under 20% busy), the CPU's median busy share at round start was "
        f"{statistics.median(busy):.0%}. "
        + ("glibc's malloc keeps freed memory for reuse in all models' runs, as setrain's trainer does on "
           "the CPU (`trainer.keep_freed_memory`)." if kept_freed_memory else "The C library's default malloc settings."),
        "",
        *lines,
        "",
        *(inference_table if latency else []),
        *ratios,
        "",
        *startup_table(seconds_to_start),
    ])  # fmt: skip


def startup_table(seconds_to_start: dict | None) -> list[str]:
    if seconds_to_start is None:
        return []
    imports, first = seconds_to_start["imports"], seconds_to_start["first step"]
    verdict = "met" if min(first) <= 5 else "not met"
    return [
        "| `python train.py trainer.device=cpu` (default config), from process start | fastest run "
        "| median | slowest run | target | |",
        "|---|---:|---:|---:|---|---|",
        f"| imports done (hydra, setrain, torch) | {min(imports):.2f} s | "
        f"{statistics.median(imports):.2f} s | {max(imports):.2f} s | | |",
        f"| first training step | {min(first):.2f} s | {statistics.median(first):.2f} s | "
        f"{max(first):.2f} s | ≤ 5 s | {verdict} |",
        "",
    ]


if __name__ == "__main__":
    main()
