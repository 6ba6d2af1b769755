"""Shared helpers: compose the real Hydra config in-process, or run the real CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# pytest-xdist's controller process loads this file but runs no test, so torch, Hydra and setrain
# are imported where they are used: the controller starts the test processes a few seconds sooner.

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny models on tiny batches, where torch's intra-op threads gain nothing and, on
    cores shared with other jobs, spend their time waiting for each other: one thread a process."""
    import torch

    torch.set_num_threads(1)

# A run small enough for 2 CPU cores (configs/debug/tiny.yaml): 64 shapes images of 16 px, 2 epochs.
TINY = ["debug=tiny"]


def compose_config(*overrides: str, config_name: str = "train"):
    """The config `python train.py <overrides>` would run with (without the hydra node); another
    `config_name` gives that command's (configs/analyze.yaml for `python -m setrain.analyze`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def run_program(*command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <command>` as a user would, without HYDRA_FULL_ERROR; returns the finished process."""
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python train.py <args>`."""
    return run_program(str(REPO_ROOT / "train.py"), *args, cwd=cwd, timeout=timeout)


def run_module(module: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>`, e.g. setrain.analyze."""
    return run_program("-m", module, *args, cwd=cwd, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, the message on stderr, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def tiered(values, slow) -> list:
    """`values` to parametrize a test with, those in `slow` run by the end-to-end suite only."""
    return [pytest.param(value, marks=pytest.mark.slow) if value in slow else value for value in values]


SHARED_RUNS = ("tiny_run", "trained_run")


def pytest_collection_modifyitems(items):
    """Under `make test-fast` (pytest-xdist, --dist loadgroup) the tests that read a shared run go
    to one test process, so that each session-wide run trains once rather than once a process."""
    for item in items:
        for run in SHARED_RUNS:
            if run in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(run))


@pytest.fixture
def tiny_config():
    return lambda *overrides: compose_config(*TINY, *overrides)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """`setrain.train(TINY)` run once in-process, shared by the fast tests that only read what a
    finished run wrote; returns its run dir and what train returned."""
    import setrain

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return run_dir, setrain.train([*TINY, f"hydra.run.dir={run_dir}"])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny SE-ResNet-20 trained through the real CLI (a few seconds), shared by the commands
    that read a finished run."""
    tmp_path = tmp_path_factory.mktemp("trained")
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return run_dir


def write_checkpoint(path: Path, *overrides: str, seed: int = 0, **entries) -> dict:
    """A checkpoint as the trainer writes it, of an untrained model of `python train.py <TINY>
    <overrides>` (initialised from `seed`), plus `entries` (such as ema=<state dict>); returns it."""
    import torch
    from omegaconf import OmegaConf

    from setrain.models import build_model

    cfg = compose_config(*TINY, *overrides)
    torch.manual_seed(seed)
    model = build_model(OmegaConf.to_container(cfg.model), num_classes=10)
    state = {
        "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1,
        "config": OmegaConf.to_container(cfg, resolve=True), **entries,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state
