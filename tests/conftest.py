"""Shared helpers: compose the real Hydra config in-process, or run the real CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

# A run small enough for 2 CPU cores: 64 shapes images of 16 px, 2 epochs.
TINY = [
    "data.train_size=64",
    "data.val_size=32",
    "data.image_size=16",
    "data.batch_size=16",
    "trainer.epochs=2",
    "trainer.device=cpu",
]


def compose_config(*overrides: str):
    """The config `python train.py <overrides>` would run with (without the hydra node)."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python train.py <args>` as a user would; returns the finished process."""
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, the message on stderr, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def tiny_config():
    return lambda *overrides: compose_config(*TINY, *overrides)
