"""`setrain.train(overrides=[...])`: a training run from Python (a notebook, a script, one's own
sweep), composed by Hydra from the package's configs/ exactly as `python train.py <overrides>`."""

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from setrain.config_checks import CONFIG_ERRORS, check_values_before_run, config_error_sentence
from setrain.engine import train as train_run
from setrain.engine.rundir import before_run, check_earlier_run, lock_run_dir, undo_refused_run
from setrain.errors import SetrainError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def train(overrides: Sequence[str] = ()) -> dict:
    """Train as `python train.py <overrides>` does and return the results dict that the run dir's
    results.json holds.

    The run dir is `hydra.run.dir` (by default outputs/<date>/<time>_<model>_<data>); it gets the
    command's files (checkpoints/, tb/, metrics.csv, results.json, .hydra/config.yaml) and its
    checks: a dir that holds a run is only continued (`resume=auto`), by one process at a time.
    Logging is the caller's (`logging.basicConfig(level=logging.INFO)` shows the epochs). A user
    error raises SetrainError, and what a refused run made in its run dir is removed.
    """
    cfg = _checked_config(list(overrides))
    run_dir = Path(cfg.hydra.run.dir).absolute()
    with open_dict(cfg):
        del cfg["hydra"]
    before = before_run(run_dir)
    lock = lock_run_dir(run_dir)
    try:
        check_earlier_run(run_dir, cfg)
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
        return train_run(cfg, run_dir)
    except SetrainError:
        undo_refused_run(before)
        raise
    finally:
        os.close(lock)


def _checked_config(overrides: list[str]) -> DictConfig:
    """The config of `python train.py <overrides>` with its hydra node, checked as the command
    checks it (config_checks); Hydra's errors as one sentence."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
            check_values_before_run(cfg)
            return cfg
    except CONFIG_ERRORS as error:
        raise SetrainError(config_error_sentence(error)) from error
