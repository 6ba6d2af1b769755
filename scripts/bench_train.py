"""Training speed of setrain's SE models, fused and unfused, against their plain twins and timm's.

    python scripts/bench_train.py   # about 10 minutes on 2 idle CPU cores; writes docs/benchmarks.md
    python scripts/bench_train.py --no-write --rounds 3 --skip-startup
    python scripts/bench_train.py --profile  # where the step time goes, op by op (one thread)
    python scripts/bench_train.py --tails  # what each stage's SE tail costs over the plain block's
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
Also on the CPU: inference latency at batch 1 (224 px, 32 px for the CIFAR group) in
`--inference-rounds` rounds (`--inference-only`: that alone, printed), and the time from `python train.py`
(default config) to its first training step. `--device cuda` measures bf16 autocast,
channels_last, batch 256 and 224 px instead. `--compile` adds channels_last settings in which
every model is compiled by torch.compile's default inductor backend (as `trainer.compile=true`);
its compilation happens in the warm-up round, which is not kept. On the CPU, malloc keeps freed
memory for reuse, as setrain's trainer sets it (`trainer.keep_freed_memory`); `--default-malloc`
measures without that. `--fused-check` is the fused-SE comparison alone (the resnet50 group,
eager and compiled, timm eager only; no inference, start-up or docs): a few minutes on a GPU.
`--tails` takes the CPU's SE overhead apart by stage: each stage's block tail alone (BN, SE,
residual add and ReLU, forward and backward) fused, unfused and plain, and SE's FCs alone, times
the stage's blocks, against the plain twin's step.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import NamedTuple

import timm
import torch
from harness import BENCHMARKS, REPO, Trainee, cpu_name, interleaved, ratio, wait_until_quiet, write_section
from timm.layers import SEModule
from torch import nn

from setrain.models import create_model
from setrain.models.fused_se import se_residual_tail
from setrain.models.se import SEBlock

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


class Group(NamedTuple):
    """Five models measured side by side: setrain's SE model fused and unfused, its twin, timm's SE
    model, timm's twin, as (label, builder)."""

    title: str
    size: int | None  # input px; None: --size
    models: list[tuple[str, object]]


class Setting(NamedTuple):
    name: str
    channels_last: bool
    autocast_dtype: torch.dtype | None
    compiled: bool


GROUPS = {
    "resnet50": Group("SE-ResNet-50", None, setrain_pair("se_resnet50") + [
        ("setrain resnet50", lambda: create_model("resnet50")),
        ("timm seresnet50", lambda: timm.create_model("seresnet50")),
        ("timm resnet50", lambda: timm.create_model("resnet50")),
    ]),
    "cifar": Group("SENet-18 (CIFAR)", 32, setrain_pair("senet18_cifar") + [
        ("setrain resnet18_cifar", lambda: create_model("resnet18_cifar")),
        ("timm seresnet18, CIFAR stem", lambda: timm_cifar("resnet18", **TIMM_SE)),
        ("timm resnet18, CIFAR stem", lambda: timm_cifar("resnet18")),
    ]),
    "resnext50": Group("SE-ResNeXt-50", None, setrain_pair("se_resnext50_32x4d") + [
        ("setrain resnext50_32x4d", lambda: create_model("resnext50_32x4d")),
        ("timm seresnext50_32x4d", lambda: timm.create_model("seresnext50_32x4d")),
        ("timm resnext50_32x4d", lambda: timm.create_model("resnext50_32x4d")),
    ]),
}  # fmt: skip

# Targets of SE-ResNet-50 per (device, compiled), issue 17: the fused model's step time over its
# twin's ("overhead", channels_last), over timm's SE model ("timm"), peak memory over the twin's
# ("memory"), batch-1 inference time over the twin's ("inference"), and the seconds from
# `python train.py` to its first step ("startup").
TARGETS = {
    ("cpu", False): dict(overhead=1.05, timm=0.95, inference=1.02, startup=5),
    ("cpu", True): dict(overhead=1.05, timm=0.95, inference=1.02),
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


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def trainees(group, size, args, device, setting: Setting) -> dict[str, Trainee]:
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    images = torch.randn(args.batch_size, 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)  # every model has >= 10 classes
    return {
        label: Trainee(build, (images, labels), device, memory_format, setting.autocast_dtype, setting.compiled)
        for label, build in group
    }


def step_times(group, size, args, device, setting: Setting) -> tuple[dict[str, list[float]], dict[str, float], dict]:
    """Seconds per training step of each model of a group, per round; its median page faults per
    step (minor faults: the OS giving the process fresh, zeroed memory); and the trainees, for
    `step_figures` once all timings are done (it gives freed memory back to the OS, after which
    the next timings would fault again)."""
    models = trainees(group, size, args, device, setting)
    times = interleaved(
        {label: partial(t.seconds_per_step, args.steps) for label, t in models.items()},
        args.rounds, args.quiet_wait, args.busy_at_round_start,
    )  # fmt: skip
    for label, values in times.items():
        print(f"{setting.name}, {label}: {', '.join(f'{1000 * v:.0f}' for v in values)} ms", flush=True)
    faults = {label: statistics.median(t.page_faults[1:]) for label, t in models.items()}  # no warm-up
    return times, faults, models


def step_figures(models: dict[str, Trainee]) -> dict[str, tuple[float, int]]:
    """Peak memory (MiB) and FLOPs of one more training step of each model, one after another."""
    return {label: (t.peak_memory_mb(), t.flops_per_step()) for label, t in models.items()}


def inference_size(group: Group) -> int:
    """Batch-1 inference input: the group's own size (CIFAR's 32 px), else ImageNet's 224 px."""
    return group.size or 224


def inference_times(group, size: int, args) -> dict[str, list[float]]:
    """Seconds per image of batch-1 CPU inference (eval mode, channels_last), per round;
    with `--compile` also of each model compiled by inductor with freezing (weights folded into
    the graph as constants, BatchNorm into the convolutions), compiled before the rounds."""
    image = torch.randn(1, 3, size, size).to(memory_format=torch.channels_last)
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
        {label: partial(latency, model) for label, model in models.items()},
        args.inference_rounds, args.quiet_wait, args.busy_at_round_start,
    )  # fmt: skip


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
    setting = Setting("fp32 channels_last", True, None, False)
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


def tail_blocks(build, size: int) -> dict[tuple[int, int, int], list]:
    """The residual blocks of an SE model by the (C, H, W) of their SE input at `size` px: a stage each."""
    model = build().eval()
    blocks = [block for block in model.modules() if isinstance(getattr(block, "se", None), SEBlock)]
    shapes = {}

    def record(se, inputs) -> None:
        shapes[se] = tuple(inputs[0].shape[1:])

    handles = [block.se.register_forward_pre_hook(record) for block in blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for handle in handles:
        handle.remove()
    stages = {}
    for block in blocks:
        stages.setdefault(shapes[block.se], []).append(block)
    return stages


def tail_measures(block, shape: tuple[int, int, int], batch: int, calls: int = 10) -> dict[str, object]:
    """Seconds per forward and backward of one block's tail on a channels_last map: BN, add and
    ReLU as in the plain twin, fused, unfused; and SE's two FCs and gate alone on the (N, C) squeeze."""
    x, identity, grad = (torch.randn(batch, *shape).to(memory_format=torch.channels_last) for _ in range(3))
    squeeze, gate_grad = torch.randn(batch, shape[0]), torch.randn(batch, shape[0])
    bn, se = block.last_bn.train(), block.se.train()
    for tensor in (x, identity, squeeze):
        tensor.requires_grad_()
    plain_inputs = (x, identity, *bn.parameters())
    se_inputs = (*plain_inputs, *se.parameters())
    tails = {  # the gradients of everything a training step takes them for, none accumulated
        "plain": lambda: torch.autograd.grad(bn(x).add_(identity).relu_(), plain_inputs, grad),
        "fused": lambda: torch.autograd.grad(se_residual_tail(x, identity, bn, se), se_inputs, grad),
        "unfused": lambda: torch.autograd.grad(se(bn(x)).add_(identity).relu_(), se_inputs, grad),
        "SE's FCs": lambda: torch.autograd.grad(se.excitation(squeeze), (squeeze, *se.parameters()), gate_grad),
    }

    def seconds(tail) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            tail()
        return (time.perf_counter() - started) / calls

    return {f"{shape}, {label}": partial(seconds, tail) for label, tail in tails.items()}


def tail_table(key: str, args) -> str:
    """Where the SE model's extra step time goes: each stage's tail, forward and backward, fused and
    unfused against the plain twin's, times its blocks, beside the plain twin's whole step."""
    group = GROUPS[key]
    size = group.size or args.size
    stages = tail_blocks(group.models[1][1], size)
    measures = {}
    for shape, blocks in stages.items():
        measures.update(tail_measures(blocks[0], shape, args.batch_size))
    twin = trainees(group.models[2:3], size, args, torch.device("cpu"), Setting("", True, None, False))
    measures["twin step"] = partial(next(iter(twin.values())).seconds_per_step, 1)
    best = {label: min(v) for label, v in interleaved(measures, args.rounds, args.quiet_wait, []).items()}
    lines = [
        f"{group.title}, batch {args.batch_size}, {size} px, fp32 channels_last: ms per tail, forward and "
        f"backward (fastest of {args.rounds} interleaved rounds); per step, times the stage's blocks",
        "",
        "| C x H x W | blocks | plain | fused | unfused | SE's FCs | per step: fused − plain | unfused − plain | SE's FCs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    totals = [0.0, 0.0, 0.0]
    for shape, blocks in stages.items():
        ms = [1000 * best[f"{shape}, {label}"] for label in ("plain", "fused", "unfused", "SE's FCs")]
        extra = [len(blocks) * (ms[1] - ms[0]), len(blocks) * (ms[2] - ms[0]), len(blocks) * ms[3]]
        totals = [t + e for t, e in zip(totals, extra)]
        cells = " | ".join(f"{v:.2f}" for v in ms + extra)
        lines.append(f"| {' x '.join(map(str, shape))} | {len(blocks)} | {cells} |")
    step = 1000 * best["twin step"]
    shares = " | ".join(f"{t:.1f} ({100 * t / step:.1f}%)" for t in totals)
    lines.append(f"| all, against the plain twin's step of {step:.0f} ms | | | | | | {shares} |")
    return "\n".join(lines)


def against(value: float, target: float | None) -> str:
    """The target and verdict cells of a ratio that should be at most `target` (None: no target)."""
    verdict = "" if target is None else ("met" if value <= target else "not met")
    return f"| {'—' if target is None else f'≤ {target}'} | {verdict} |"


def ratio_row(what: str, values: dict, numerator: str, denominator: str, target: float | None) -> str:
    r = ratio(values, numerator, denominator)
    return (
        f"| {what}: {numerator} / {denominator} | {r.best:.3f} | {r.median:.3f} | {r.low:.3f}–{r.high:.3f} "
        + against(r.best, target)
    )


def memory_row(what: str, memory: dict, numerator: str, denominator: str, target: float | None) -> str:
    value = memory[numerator] / memory[denominator]
    return f"| {what}: {numerator} / {denominator} | {value:.3f} | | " + against(value, target)


def group_ratios(name: str, key: str, labels: list, seconds: dict, memory: dict, setting: Setting, device) -> list[str]:
    """The ratio rows of one group in one setting, against the targets where the issue sets them."""
    fused, se, twin, timm_se, timm_twin = labels
    targets = TARGETS[(device.type, setting.compiled)] if key == "resnet50" else {}
    overhead = targets.get("overhead") if setting.channels_last else None
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
    parser.add_argument(
        "--inference-rounds", type=int, default=30,
        help="interleaved rounds of batch-1 CPU inference per model (5 images each)",
    )  # fmt: skip
    parser.add_argument(
        "--inference-only", action="store_true", help="CPU batch-1 inference alone; prints, writes nothing"
    )
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
        "--tails", action="store_true",
        help="print where the SE models' extra step time goes: each stage's block tail, forward and backward, "
        "fused and unfused against the plain twin's (CPU, fp32 channels_last), and stop",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="print the op-level CPU profile of the SE-ResNet-50 group (one thread) and stop",
    )  # fmt: skip
    args = parser.parse_args()
    cpu_only = args.tails or args.profile
    if cpu_only and args.device == "cuda":
        parser.error("--tails and --profile measure on the CPU; leave out --device cuda.")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.size = args.size or (224 if cuda else 96)
    args.groups = (args.groups or ("resnet50" if args.fused_check else "resnet50,cifar")).split(",")
    if args.fused_check:
        args.compile = args.skip_startup = args.no_write = True
    if args.inference_only:  # a section without the training tables would replace the written one
        args.skip_startup = args.no_write = True
    if cuda:
        args.quiet_wait, args.skip_startup = 0, True
    args.busy_at_round_start = []  # the CPU busy share (other processes') at each round's start
    return args


def settings_of(args, device: torch.device) -> list[Setting]:
    if device.type == "cuda":
        settings = [Setting("bf16 channels_last", True, torch.bfloat16, False)]
    else:
        settings = [Setting("fp32", False, None, False), Setting("fp32 channels_last", True, None, False)]
    if args.fused_check:
        settings = [setting for setting in settings if setting.channels_last]
    if args.compile:
        settings += [s._replace(name=f"{s.name}, compiled", compiled=True) for s in settings if s.channels_last]
    return settings


def measured_models(args, setting: Setting) -> dict[str, Group]:
    """The groups as measured in a setting: `--fused-check` compiles setrain's models only."""
    skip_timm = args.fused_check and setting.compiled
    return {
        key: group._replace(models=[m for m in group.models if not (skip_timm and "timm" in m[0])])
        for key, group in GROUPS.items() if key in args.groups
    }  # fmt: skip


def measure(args, device: torch.device) -> tuple[list[str], list[str]]:
    """The table rows and ratio rows of every group in every setting.

    On the CPU, timings of every setting first, then peak memory and FLOPs from one more step of
    each model (measuring memory gives freed memory back to the OS); on CUDA, each setting's
    figures and rows as soon as it is timed, so a run stopped early still reports."""
    measured = {}
    for setting in settings_of(args, device):
        for key, group in measured_models(args, setting).items():
            measured[setting, key] = step_times(group.models, group.size or args.size, args, device, setting)
            if device.type == "cuda":
                measured[setting, key] = figures_and_rows(args, device, setting, key, *measured[setting, key])
                print("\n".join(measured[setting, key][0] + measured[setting, key][1]), flush=True)
    lines, ratios = [], []
    for (setting, key), result in measured.items():
        if device.type == "cpu":
            result = figures_and_rows(args, device, setting, key, *result)
        lines += result[0]
        ratios += result[1]
    return lines, ratios


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    kept_freed_memory = False
    if device.type == "cpu" and not args.default_malloc:
        from setrain.engine.runtime import keep_freed_memory  # imports the trainer, and hydra

        kept_freed_memory = keep_freed_memory()
    if args.profile:
        print(op_profile(GROUPS["resnet50"].models, args, torch.device("cpu")))
        return
    if args.tails:
        print("\n\n".join(tail_table(key, args) for key in args.groups))
        return
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lines, ratios = ([], []) if args.inference_only else measure(args, device)
    inference = device.type == "cpu" and not args.fused_check
    latency = {key: inference_times(group.models, inference_size(group), args) for key, group in GROUPS.items()
               if inference and key in args.groups}  # fmt: skip
    seconds_to_start = None if args.skip_startup else startup(args.startup_runs, args.quiet_wait)
    text = report(args, device, kept_freed_memory, lines, ratios, latency, seconds_to_start)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote {BENCHMARKS}")


def figures_and_rows(args, device, setting, key, seconds, faults, models) -> tuple[list[str], list[str]]:
    """A group's table rows and ratio rows in one setting, after one more step of each model for
    its peak memory and FLOPs."""
    title, size, group = GROUPS[key]
    size = size or args.size
    peak_tf = peak_tflops(device) if setting.autocast_dtype is not None else None
    figures = step_figures(models)
    rows = []
    for label, (memory, flops) in figures.items():
        fastest, median = min(seconds[label]), statistics.median(seconds[label])
        tflops = flops / fastest / 1e12
        utilisation = f"{100 * tflops / peak_tf:.1f}%" if peak_tf else "n/a"
        rows.append(
            f"| {setting.name} | {label} | {args.batch_size}x{size} px | {1000 * fastest:.1f} | "
            f"{1000 * median:.1f} | {args.batch_size / fastest:.1f} | {memory:,.0f} | "
            f"{1000 * tflops:,.0f} | {utilisation} | {faults[label]:,.0f} |"
        )
    labels = [label for label, _ in group]
    memory = {label: figure[0] for label, figure in figures.items()}
    return rows, group_ratios(f"{setting.name}, {title}", key, labels, seconds, memory, setting, device)


def inference_ratios(key: str, latency: dict, compile: bool) -> list[str]:
    """The batch-1 inference ratio rows of group `key`; SE-ResNet-50's fused one has a target."""
    group = GROUPS[key]
    fused, se, twin, timm_se, _ = (label for label, _ in group.models)
    rows = []
    for suffix, compiled in (("", False), (", compiled", True)) if compile else (("", False),):
        what = f"CPU inference, batch 1, {inference_size(group)} px{suffix}, {group.title}"
        target = TARGETS["cpu", compiled]["inference"] if key == "resnet50" else None
        rows.append(ratio_row(f"{what}, SE overhead, fused", latency, fused + suffix, twin + suffix, target))
        rows.append(ratio_row(f"{what}, SE overhead, unfused", latency, se + suffix, twin + suffix, None))
        rows.append(ratio_row(f"{what}, against timm", latency, fused + suffix, timm_se + suffix, None))
    return rows


def report(args, device, kept_freed_memory, lines, ratios, latency, seconds_to_start) -> str:
    """The section of docs/benchmarks.md: how it was measured, the tables, the ratios."""
    latency_rows = [
        f"| {inference_size(GROUPS[key])} px | {label} | {1000 * min(times):.1f} | {1000 * statistics.median(times):.1f} |"
        for key, group_latency in latency.items() for label, times in group_latency.items()
    ]  # fmt: skip
    for key, group_latency in latency.items():
        ratios += inference_ratios(key, group_latency, args.compile)
    load = os.getloadavg()[0]
    busy = args.busy_at_round_start or [float("nan")]
    quiet = sum(b <= 0.2 for b in busy)
    where = cpu_name()
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} and {where}"
    inference_table = [
        f"CPU inference latency, batch 1, channels_last, eval mode, `torch.inference_mode`, "
        f"{args.inference_rounds} interleaved rounds of 5 images:",
        "",
        "| input | model | ms / image, fastest round | median |",
        "|---|---|---:|---:|",
        *latency_rows,
        "",
    ]
    return "\n".join([
        SECTION,
        "",
        f"Measured by `python scripts/bench_train.py` on {where}, device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; 1-minute load average {load:.1f} at the end. Interleaved, "
        + (f"{args.rounds} rounds of {args.steps} steps, batch {args.batch_size}; " if lines else "")
        + f"each round "
        f"waited up to {args.quiet_wait:.0f} s for an idle CPU; {quiet} of {len(busy)} rounds "
        f"started on one (under 20% busy), the CPU's median busy share at round start was "
        f"{statistics.median(busy):.0%}. "
        + ("glibc's malloc keeps freed memory for reuse in all models' runs, as setrain's trainer does on "
           "the CPU (`trainer.keep_freed_memory`)." if kept_freed_memory else "The C library's default malloc settings."),
        "",
        *(step_table(lines) if lines else []),
        *(inference_table if latency else []),
        "| ratio | fastest rounds | per round: median | range | target | |",
        "|---|---:|---:|---|---|---|",
        *ratios,
        "",
        *startup_table(seconds_to_start),
    ])  # fmt: skip


def step_table(lines: list[str]) -> list[str]:
    return [
        "| setting | model | input | ms / step, fastest round | median | images/s | peak MiB | GFLOP/s "
        "| MFU | page faults / step |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
        *lines,
        "",
    ]


def startup_table(seconds_to_start: dict | None) -> list[str]:
    if seconds_to_start is None:
        return []
    imports, first = seconds_to_start["imports"], seconds_to_start["first step"]
    target = TARGETS["cpu", False]["startup"]
    verdict = "met" if min(first) <= target else "not met"
    return [
        "| `python train.py trainer.device=cpu` (default config), from process start | fastest run "
        "| median | slowest run | target | |",
        "|---|---:|---:|---:|---|---|",
        f"| imports done (hydra, setrain, torch) | {min(imports):.2f} s | "
        f"{statistics.median(imports):.2f} s | {max(imports):.2f} s | | |",
        f"| first training step | {min(first):.2f} s | {statistics.median(first):.2f} s | "
        f"{max(first):.2f} s | ≤ {target} s | {verdict} |",
        "",
    ]


if __name__ == "__main__":
    main()
