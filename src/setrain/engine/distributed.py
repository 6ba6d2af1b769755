"""DDP under torchrun: which process this is, and sums across processes.

`torchrun --nproc_per_node=N train.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them this
is one process and every function here is a no-op, so the loop reads the same either way.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes TensorBoard curves and checkpoints."""
        return self.rank == 0


def init_processes(device_type: str) -> Processes:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); one process otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Processes(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def close_processes(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(processes: Processes, *values: torch.Tensor) -> list[torch.Tensor]:
    """Sum each tensor over all processes (in one collective), e.g. loss sums and sample counts."""
    if not processes.distributed:
        return list(values)
    stacked = torch.stack([value.double() for value in values])
    dist.all_reduce(stacked)
    return list(stacked.unbind())


def broadcast_object(processes: Processes, value):
    """Rank 0's `value` on every process (a run directory, a stop request)."""
    if not processes.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_object(processes: Processes, value) -> list | None:
    """Every process's `value` in rank order, on rank 0 (None elsewhere): what only rank 0 writes,
    such as each process's random state in a checkpoint."""
    if not processes.distributed:
        return [value]
    gathered = [None] * processes.world_size if processes.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_buffers(processes: Processes, model: torch.nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics. DDP broadcasts them before each training
    forward, so after the last one each process holds its own update; evaluating with those
    would score each share of the validation set with a slightly different model."""
    if processes.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
