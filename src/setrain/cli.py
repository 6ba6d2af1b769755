"""Glue between the Hydra entry points (train.py, setrain.analyze) and the engine: run dir, user errors.

A user error (SetrainError) is printed as one sentence without a traceback; set
HYDRA_FULL_ERROR=1 to see the full trace. In a multirun the failed job is reported and the
sweep goes on; the process then exits non-zero.
"""

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from setrain.engine import train
from setrain.errors import SetrainError

failed_jobs: list[str] = []


def run_training(cfg: DictConfig) -> float | None:
    """Train in Hydra's run dir; returns the best val top-1 (a sweeper's objective)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return train(cfg, run_dir)["best"]["val_top1"]
    except SetrainError as error:
        report_user_error(error)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(1)
        failed_jobs.append(f"{hydra_cfg.job.num} ({run_dir})")
        return None


def report_user_error(error: SetrainError) -> None:
    """Print the error's sentence as one line, or re-raise it when HYDRA_FULL_ERROR=1 asks for the trace."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"setrain: error: {error}", file=sys.stderr)


def exit_status() -> int:
    """Non-zero after a multirun in which some job failed, listing those jobs."""
    if failed_jobs:
        print(f"setrain: {len(failed_jobs)} job(s) failed: {', '.join(failed_jobs)}", file=sys.stderr)
        return 1
    return 0
