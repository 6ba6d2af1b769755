"""Glue between the entry points (train.py, setrain.analyze, ...) and the engine: run dir, user errors.

A user error (SetrainError) is printed as one sentence without a traceback; set
HYDRA_FULL_ERROR=1 to see the full trace. In a multirun the failed job is reported and the
sweep goes on; the process then exits non-zero. A multirun started again with the same
`hydra.sweep.dir` skips the jobs that finished and resumes the others from their checkpoints.
"""

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from setrain.engine import train
from setrain.engine.signals import RunStopped
from setrain.errors import SetrainError

log = logging.getLogger(__name__)
failed_jobs: list[str] = []


def run_training(cfg: DictConfig) -> float | None:
    """Train in Hydra's run dir; returns the best val top-1 (a sweeper's objective)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        results = run_dir / "results.json"
        if results.is_file():
            log.info("Job %s finished earlier (%s); skipping it.", hydra_cfg.job.num, results)
            return json.loads(results.read_text())["best"]["val_top1"]
        if cfg.resume is None and (run_dir / "checkpoints" / "last.pt").is_file():
            cfg.resume = "auto"
    try:
        return train(cfg, run_dir)["best"]["val_top1"]
    except RunStopped as stopped:
        log.info("%s", stopped)
        sys.exit(stopped.exit_code)
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


def run_command(command: Callable, cfg) -> None:
    """Run `command(cfg)`; a user error ends it with one line and exit code 1."""
    try:
        command(cfg)
    except SetrainError as error:
        report_user_error(error)
        sys.exit(1)


def exit_status() -> int:
    """Non-zero after a multirun in which some job failed, listing those jobs."""
    if failed_jobs:
        print(f"setrain: {len(failed_jobs)} job(s) failed: {', '.join(failed_jobs)}", file=sys.stderr)
        return 1
    return 0
