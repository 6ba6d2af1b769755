"""DDP under torchrun or srun: which process this is, and sums across processes.

`torchrun --nproc_per_node=N train.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `srun` (a SLURM
job of several tasks, e.g. through hydra/launcher=slurm) sets SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID and the job's node list, which `slurm_environment` turns into the same variables.
Without either this is one process and every function here is a no-op, so the loop reads the
same either way.
"""

import os
import random
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from setrain.errors import SetrainError


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


def slurm_environment() -> dict[str, str]:
    """torchrun's variables for a task that srun started, from SLURM's: rank 0 listens on the
    job's first node, at MASTER_PORT or a port drawn from the job id (as submitit's
    TorchDistributedEnvironment does), so the tasks of one job agree and jobs sharing a node do
    not collide. Empty where torchrun set them, or where SLURM started a single task."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]),
        "MASTER_PORT": env.get("MASTER_PORT") or str(random.Random(env.get("SLURM_JOB_ID", "")).randint(20000, 60000)),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-04,07],cpu1` -> `gpu03`."""
    prefix, ranges, suffix = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist).groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "") + suffix


def launched_rank() -> int:
    """This process's rank as torchrun or srun set it, known before the process group exists
    (setrain.cli: rank 0 alone claims the run dir and requeues the job)."""
    return int(os.environ.get("RANK") or slurm_environment().get("RANK", 0))


def restarts_itself() -> bool:
    """Whether this run may be its own restart, so that resume=auto is the right default: under
    torchrun with --max-restarts, whose elastic agents start the whole group again after a failure
    (the healthy nodes' agents without counting it in TORCHELASTIC_RESTART_COUNT, so only the limit
    tells every process alike), or in a SLURM job requeued after a pre-emption (SLURM_RESTART_COUNT)."""
    return any(int(os.environ.get(name) or 0) > 0 for name in ("TORCHELASTIC_MAX_RESTARTS", "SLURM_RESTART_COUNT"))


def init_processes(device_type: str) -> Processes:
    """Join the process group torchrun or srun started (NCCL on GPUs, gloo on CPUs); one process otherwise."""
    os.environ.update(slurm_environment())
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Processes()
    if not dist.is_initialized():
        check_restartable_store()
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Processes(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def check_restartable_store() -> None:
    """Refuse torchrun --max-restarts on the store its elastic agents share with the workers:
    torch keeps that store across restarts, so a restarted process can read the dead group's
    addresses (gloo's, NCCL's unique id) and fail to connect or hang (pytorch/pytorch#135712,
    still so in torch 2.14). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each rendezvous round a
    fresh store on rank 0; the static rendezvous (--master-port) always shares the agent's."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise SetrainError(
            "torchrun --max-restarts would restart the group on its agents' shared store, which keeps the failed "
            "group's addresses, so the restarted processes could fail to connect (pytorch/pytorch#135712): start it "
            "as `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...` with the c10d rendezvous (--standalone or "
            "--rdzv-backend=c10d, not --master-port) on every node."
        )


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
