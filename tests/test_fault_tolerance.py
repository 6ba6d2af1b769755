"""Runs that are killed, pre-empted, swept again or spread over processes, through the real CLI.

Every interrupted run must end bitwise identical to the uninterrupted reference run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, assert_user_error, run_cli
from setrain.engine.checkpoint import load_checkpoint
from setrain.engine.loop import evaluate
from setrain.data import build_data
from setrain.models import build_model

pytestmark = pytest.mark.slow

# 64 steps over 2 epochs, a checkpoint after each: long enough to be interrupted on purpose.
LONG = ["debug=tiny", "data.train_size=512", "trainer.checkpoint_every_n_steps=1"]


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    command = [sys.executable, str(REPO_ROOT / "train.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(root: Path, pattern: str, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll the (atomically replaced) checkpoint matching `pattern` under `root` until the run
    has done `step` optimizer steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        found = list(root.glob(pattern))
        if found and load_checkpoint(found[0])["global_step"] >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{root / pattern} never reached step {step}")


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must match."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(*LONG, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_run_killed_with_sigkill_resumes_to_identical_weights(reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start_cli(*LONG, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_step(run_dir, "checkpoints/last.pt", 20, process)
    process.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-write
    process.communicate()
    assert process.returncode == -signal.SIGKILL and not (run_dir / "results.json").exists()

    resumed = run_cli(*LONG, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout
    assert_same_weights(final_weights(run_dir), final_weights(reference))


def test_sigterm_saves_and_a_swept_again_multirun_skips_finished_jobs_and_resumes_the_rest(reference, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep = ["-m", *LONG, "model.se.reduction=8,16", f"hydra.sweep.dir={sweep_dir}"]
    process = start_cli(*sweep, cwd=tmp_path)
    wait_for_step(sweep_dir, "1_*/checkpoints/last.pt", 20, process)  # the second job
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stdout
    assert "Stopped by SIGTERM" in stdout and "resume=auto" in stdout
    first, second = sorted(sweep_dir.glob("[01]_*"))
    assert (first / "results.json").is_file() and not (second / "results.json").exists()
    assert load_checkpoint(second / "checkpoints" / "last.pt")["epoch_progress"] is not None
    finished_at = (first / "results.json").stat().st_mtime_ns

    again = run_cli(*sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Job 0 finished earlier" in again.stdout and "Resumed from" in again.stdout
    assert (first / "results.json").stat().st_mtime_ns == finished_at
    assert json.loads((second / "results.json").read_text())["final"]["epoch"] == 2
    assert_same_weights(final_weights(second), final_weights(reference))  # r=16 is the default


def test_a_signal_no_training_step_sees_stops_the_sweep_after_saving_and_the_sweep_continues(tmp_path):
    """SIGTERM during validation, SIGINT after a job's last step: each stops the sweep with
    128 + signal once the epoch is saved, and the same command continues it."""
    sweep_dir = tmp_path / "sweep"
    # 8 steps an epoch, then a validation long enough (512 images) for the signals to land in it.
    sweep = ["-m", *LONG, "data.train_size=128", "data.val_size=512", "model.se.reduction=8,16", f"hydra.sweep.dir={sweep_dir}"]
    process = start_cli(*sweep, cwd=tmp_path)
    wait_for_step(sweep_dir, "0_*/checkpoints/last.pt", 8, process)  # epoch 1 trained: validating
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stdout
    assert "Stopped by SIGTERM after epoch 1/2" in stdout and "Run the same command again" in stdout
    (first,) = sweep_dir.glob("0_*")
    saved = load_checkpoint(first / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["global_step"], saved["epoch_progress"]) == (1, 8, None)
    assert not list(sweep_dir.glob("1_*"))

    process = start_cli(*sweep, cwd=tmp_path)
    wait_for_step(first, "checkpoints/last.pt", 16, process)  # job 0's last step: validating
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stdout
    assert "Resumed from" in stdout and "Stopped by SIGINT before job 1" in stdout
    assert (first / "results.json").is_file()
    assert not list(sweep_dir.glob("1_*/checkpoints/last.pt"))

    again = run_cli(*sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Job 0 finished earlier" in again.stdout
    (second,) = sweep_dir.glob("1_*")
    assert json.loads((second / "results.json").read_text())["final"]["epoch"] == 2


def test_diverging_run_stops_with_one_sentence_and_writes_no_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*LONG, "trainer.checkpoint_every_n_steps=null", "optimizer.lr=1e30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_user_error(result, "The training loss became", "lower the learning rate")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (run_dir / "checkpoints" / "last.pt").exists()


def test_ddp_with_gloo_on_two_processes_counts_every_validation_image_once(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO_ROOT / "train.py"), "debug=tiny", "data.val_size=30", "data.batch_size=8", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["processes"] == 2 and results["global_step"] == 2 * 64 // 16
    assert result.stdout.count("Done: val top-1") == 1  # rank 0 alone logs
    events = sorted(path.parent.name for path in (run_dir / "tb").rglob("events.out.tfevents.*"))
    assert events == ["tb", "train", "val"]  # rank 0's alone

    # The val metrics summed over both processes equal one process evaluating all 30 images.
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = build_model(state["config"]["model"], 10)
    model.load_state_dict(state["model"])
    data = build_data(state["config"]["data"], torch.device("cpu"))
    single = evaluate(model, torch.nn.CrossEntropyLoss(), data.val_loader, torch.device("cpu"))
    assert results["final"]["val_top1"] == pytest.approx(single["top1"])
    assert results["final"]["val_loss"] == pytest.approx(single["loss"], rel=1e-5)


def torchrun(*args: str, cwd: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO_ROOT / "train.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc): torchrun starts its workers in sessions of their own."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [descendant for child in children for descendant in process_tree(int(child))]


def test_ddp_run_killed_with_sigkill_resumes_each_process_to_identical_weights(tmp_path):
    """MixUp draws from each process's own random stream (seeded by rank): the resumed run matches
    only if every process gets its own state back, not rank 0's."""
    ddp = [
        "debug=tiny", "data.train_size=512", "data.val_size=16", "data.batch_size=8", "trainer.mixup_alpha=0.4",
        "trainer.checkpoint_every_n_steps=1",
    ]  # fmt: skip
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    uninterrupted = torchrun(*ddp, f"hydra.run.dir={reference}", cwd=tmp_path)
    _, stderr = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, stderr[-3000:]

    interrupted = torchrun(*ddp, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_step(run_dir, "checkpoints/last.pt", 10, interrupted)  # of 2 x 32
    for pid in process_tree(interrupted.pid):  # torchrun and both training processes, as a pre-emption
        os.kill(pid, signal.SIGKILL)
    interrupted.communicate()
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["global_step"] < 64 and not (run_dir / "results.json").exists()
    assert len(state["other_ranks"]) == 1
    assert not torch.equal(state["rng"]["torch"], state["other_ranks"][0]["rng"]["torch"])

    resumed = torchrun(*ddp, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "Resumed from" in stdout + stderr
    assert_same_weights(final_weights(run_dir), final_weights(reference))
