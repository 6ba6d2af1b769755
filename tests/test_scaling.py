"""Beyond one process: SLURM tasks (simulated: SLURM_* variables for 2 local processes on gloo),
SLURM's warning signal (save, requeue, resume), and torchrun over two "nodes" on 127.0.0.1 whose
elastic agents restart the group after a worker is killed. Every interrupted run must end bitwise
identical to the uninterrupted one, whichever launcher started its processes."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import REPO_ROOT, assert_user_error, run_cli
from setrain.cli import ClaimRunDir
from setrain.engine.checkpoint import load_checkpoint
from setrain.engine.distributed import first_host, init_processes, launched_rank, slurm_environment
from setrain.errors import SetrainError
from test_fault_tolerance import assert_same_weights, final_weights, process_tree, wait_for_step

# 2 processes x 16 steps x 2 epochs, a checkpoint and a (collective) stop check after each step.
DDP = [
    "debug=tiny", "data.train_size=256", "data.val_size=16", "data.batch_size=8", "trainer.mixup_alpha=0.4",
    "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=1",
]  # fmt: skip


def test_srun_tasks_take_rank_world_size_and_rank_0s_address_from_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242"}
    for name, value in {**slurm, "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(name, value)
    found = slurm_environment()
    assert {key: found[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
    }  # fmt: skip
    assert 20000 <= int(found["MASTER_PORT"]) <= 60000
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert slurm_environment()["MASTER_PORT"] == found["MASTER_PORT"]  # every task of the job agrees
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert slurm_environment()["MASTER_PORT"] != found["MASTER_PORT"]  # another job on the node does not collide
    assert launched_rank() == 0 and ClaimRunDir().claims
    monkeypatch.setenv("SLURM_PROCID", "9")
    assert launched_rank() == 9 and not ClaimRunDir().claims  # rank 0 alone claims the run dir

    monkeypatch.setenv("RANK", "3")  # torchrun inside a SLURM job: its variables win
    assert slurm_environment() == {} and launched_rank() == 3
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: one process
    assert slurm_environment() == {} and launched_rank() == 0


def test_the_first_host_of_a_slurm_node_list():
    assert first_host("node17") == "node17"
    assert first_host("a01,b02") == "a01"
    assert first_host("gpu[003-004,9],cpu1") == "gpu003"
    assert first_host("rack2-[5,7]-ib") == "rack2-5-ib"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**variables: str) -> dict:
    """The test's environment for a training process; one thread each, as torchrun sets it, so
    every launcher computes alike."""
    base = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR" and not key.startswith("SLURM_")}
    return {**base, "OMP_NUM_THREADS": "1", **variables}


def start(command: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def srun(run_dir: Path | None, port: int, cwd: Path, **variables: str) -> list[subprocess.Popen]:
    """What `srun` starts for a job of 2 tasks on one node: `python train.py` twice, with SLURM's
    variables. A fake `scontrol` on PATH logs its arguments to cwd/scontrol.log."""
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": str(port),
        "PATH": f"{cwd / 'bin'}{os.pathsep}{os.environ['PATH']}", **variables,
    }  # fmt: skip
    (cwd / "bin").mkdir(exist_ok=True)
    scontrol = cwd / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {cwd / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    command = [sys.executable, str(REPO_ROOT / "train.py"), *DDP, *([f"hydra.run.dir={run_dir}"] if run_dir else [])]
    return [
        start(command, environment(**slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)), cwd)
        for rank in range(2)
    ]  # fmt: skip


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Each process's exit status and output (stdout and stderr)."""
    outputs = [process.communicate(timeout=300) for process in processes]
    return [(process.returncode, stdout + stderr) for process, (stdout, stderr) in zip(processes, outputs)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted job of 2 SLURM tasks, in the default run dir: one DDP run, in one run dir
    (each task's Hydra names one by its clock), that rank 0 writes."""
    cwd = tmp_path_factory.mktemp("slurm_reference")
    (first, first_output), (second, second_output) = finish(srun(None, free_port(), cwd))
    assert first == second == 0, first_output[-3000:] + second_output[-3000:]
    assert "x 2 processes" in first_output and "Done: val top-1" in first_output
    assert "Done: val top-1" not in second_output  # rank 0 alone logs
    (run_dir,) = (cwd / "outputs").glob("*/*")
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == 2 * 256 // (2 * 8)
    return run_dir


@pytest.mark.slow
def test_slurms_warning_signal_saves_requeues_and_the_requeued_job_resumes_to_identical_weights(reference, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    tasks = srun(run_dir, port, tmp_path)
    wait_for_step(run_dir, "checkpoints/last.pt", 6, tasks[0])
    for task in tasks:  # SLURM signals every task of the job (`--signal=USR2@120`)
        task.send_signal(signal.SIGUSR2)
    for status, output in finish(tasks):
        assert status == 128 + signal.SIGUSR2, output[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # by rank 0 alone
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 6 <= saved["global_step"] < 32 and not (run_dir / "results.json").exists()

    # SLURM starts the requeued job with the same command: it continues without resume=auto.
    resumed = finish(srun(run_dir, port, tmp_path, SLURM_RESTART_COUNT="1"))
    assert [status for status, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    assert "Resumed from" in resumed[0][1]
    assert_same_weights(final_weights(run_dir), final_weights(reference))


@pytest.mark.slow
def test_torchrun_on_two_nodes_restarts_the_group_after_a_sigkill_and_ends_with_identical_weights(reference, tmp_path):
    """Two elastic agents on 127.0.0.1 as two nodes of one process each, started as README says
    (c10d rendezvous, --max-restarts=1, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); rank 0's worker,
    which holds the group's store and writes the checkpoints, is killed mid-training."""
    run_dir, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}", "--rdzv-id=setrain-test", "--max-restarts=1", "--monitor-interval=0.1",
        str(REPO_ROOT / "train.py"), *DDP, f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    nodes = [start(command, environment(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"), tmp_path) for _ in range(2)]
    try:
        wait_for_step(run_dir, "checkpoints/last.pt", 6, nodes[0])
        os.kill(worker_of_rank(0, nodes), signal.SIGKILL)
        results = finish(nodes)
    finally:  # a group that failed or hung: its processes must not outlive the test
        for node in nodes:
            end_process_tree(node)
    assert [status for status, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    output = results[0][1] + results[1][1]
    assert "Resumed from" in output and output.count("Done: val top-1") == 1
    assert_same_weights(final_weights(run_dir), final_weights(reference))


def test_torchrun_restarts_on_the_agents_shared_store_are_refused(monkeypatch):
    """torchrun's agents keep the store they share with the workers across restarts, so a
    restarted group can read the dead one's addresses and fail to connect (pytorch/pytorch#135712):
    such a start is refused with the way to start instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(SetrainError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun"):
        init_processes("cpu")
    assert not dist.is_initialized()


@pytest.mark.slow  # a CLI run
def test_a_refused_torchrun_worker_leaves_no_run_dir(monkeypatch, tmp_path):
    """Every process of the group refuses before Hydra makes its run dir, not rank 0 alone."""
    torchrun_worker = {
        "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "TORCHELASTIC_MAX_RESTARTS": "1",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }  # fmt: skip
    for key, value in torchrun_worker.items():
        monkeypatch.setenv(key, value)
    result = run_cli("debug=tiny", "hydra.run.dir=run", cwd=tmp_path)
    assert_user_error(result, "setrain: error: torchrun --max-restarts would restart the group on its agents' shared store")
    assert list(tmp_path.iterdir()) == []


def worker_of_rank(rank: int, agents: list[subprocess.Popen]) -> int:
    """The process an elastic agent started with RANK=`rank` (agents start their workers as children)."""
    (worker,) = [
        pid for agent in agents for pid in map(int, Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split())
        if f"\0RANK={rank}\0" in "\0" + Path(f"/proc/{pid}/environ").read_text()
    ]  # fmt: skip
    return worker


def end_process_tree(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            for pid in reversed(process_tree(process.pid)):
                os.kill(pid, signal.SIGKILL)
        process.communicate()


@pytest.mark.slow
def test_submitits_checkpoint_hook_requeues_the_job_after_the_warning_signal_and_it_resumes(tmp_path):
    """Through Hydra's submitit launcher on this machine (submitit's local executor keeps SLURM's
    protocol: USR2, the launcher's checkpoint hook, requeue); needs the `cluster` extra."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    single = ["debug=tiny", "data.train_size=256", "data.val_size=16", "trainer.checkpoint_every_n_steps=1"]
    train = [sys.executable, str(REPO_ROOT / "train.py")]
    ((status, output),) = finish([start([*train, *single, f"hydra.run.dir={tmp_path / 'reference'}"], environment(), tmp_path)])
    assert status == 0, output[-3000:]
    sweep_dir = tmp_path / "sweep"
    sweep_command = [*train, "-m", "hydra/launcher=submitit_local", *single, f"hydra.sweep.dir={sweep_dir}"]
    sweep = start(sweep_command, environment(), tmp_path)
    wait_for_step(sweep_dir, "*/checkpoints/last.pt", 6, sweep)
    (job,) = [pid for pid in process_tree(sweep.pid) if "submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(job, signal.SIGUSR2)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr[-3000:]
    submitit_log = "".join(path.read_text() for path in (sweep_dir / ".submitit").glob("*/*_log.*"))
    assert "Calling checkpoint method" in submitit_log and "Requeued job" in submitit_log
    assert "Resumed from" in submitit_log
    (run_dir,) = [path.parent.parent for path in sweep_dir.glob("*/checkpoints/last.pt")]
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "reference"))
