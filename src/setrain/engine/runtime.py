"""What a run needs from the machine: the device, the precision and memory layout that pay on it,
malloc's settings on the CPU, and the random states a checkpoint keeps."""

import ctypes
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from setrain.errors import SetrainError

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}  # autocast dtypes; `auto` resolves to one


def resolve_device(name: str) -> torch.device:
    """`auto` picks the GPU when there is one; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SetrainError(
                f"trainer.device={name} but PyTorch sees no CUDA GPU; use trainer.device=auto or cpu."
            )
        return torch.device(name)
    raise SetrainError(f"trainer.device={name!r} is not supported; use auto, cpu or cuda.")


def process_gpu(local_rank: int) -> torch.device:
    """The GPU of the process with this rank on its node: its own index when the process sees all
    the node's GPUs (torchrun, SLURM's gpus_per_node), the one it sees when SLURM gives each task
    one (gpus_per_task=1 sets CUDA_VISIBLE_DEVICES per task)."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# glibc's mallopt parameters (malloc.h) and their default values (mallopt(3)); -1 as the trim
# threshold turns trimming off.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _mallopt(trim_threshold: int, mmap_max: int) -> bool:
    """Set glibc's trim threshold and mmap count; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), no CDLL(None) (Windows)
        return False
    return bool(mallopt(M_MMAP_MAX, mmap_max)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def keep_freed_memory() -> bool:
    """Let malloc keep the memory of freed tensors for reuse rather than give it back to the OS.

    A training step frees and allocates every feature map again. By default glibc serves large
    blocks with fresh mmap pages and trims the heap, so each step takes thousands of page faults
    that zero the memory before use (docs/benchmarks.md, Page faults). torch's caching allocator
    does the same on CUDA. The process keeps its peak memory while the setting lasts. Returns
    False where the C library is not glibc (nothing is changed there).
    """
    return _mallopt(-1, 0)


@contextmanager
def freed_memory_kept(enabled: bool) -> Iterator[None]:
    """keep_freed_memory() for one run: malloc's defaults come back when it ends, so a later job
    of a sweep in the same process (Hydra's basic launcher) starts as it was asked to."""
    if not enabled or not keep_freed_memory():
        yield
        return
    try:
        yield
    finally:
        _mallopt(DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX)
        _trim_heap()


def _trim_heap() -> None:
    """Give the memory malloc kept back to the OS now (malloc_trim(3)): with the defaults back, a
    kept free block would still serve later allocations without page faults until a free happened
    to trim the heap."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU that has it (no loss scaling needed), else 16 with the scaler on CUDA,
    and 32 on the CPU, where autocast is slower than float32 for convolutions."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "32"
    return "bf16" if torch.cuda.is_bf16_supported() else "16"


def resolve_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """`auto`: NHWC on CUDA, where cuDNN's convolutions and the tensor cores want it."""
    return device.type == "cuda" if channels_last == "auto" else bool(channels_last)


def resolve_compile(compile: bool | str, device: torch.device) -> str | None:
    """The torch.compile backend, or None: `true` is inductor; `auto` is inductor on CUDA only,
    where its fused kernels repay the compile time within an epoch, unlike on a CPU."""
    if compile == "auto":
        return "inductor" if device.type == "cuda" else None
    return "inductor" if compile is True else (compile or None)
