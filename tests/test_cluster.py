"""configs/hydra/: the SLURM launcher and the Optuna sweeper, with their plugins (the `cluster` extra).

Skipped where the plugins are not installed: pip install 'setrain[cluster]'.
"""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO_ROOT, TINY, run_cli


def hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra


def test_slurm_launcher_submits_one_gpu_job_per_run():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu").launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)


def test_optuna_sweeper_maximizes_top1_over_lr_and_reduction():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweeper = hydra_config("hydra/sweeper=optuna_se").sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert OmegaConf.to_container(sweeper.params) == {
        "optimizer.lr": "tag(log, interval(0.001, 0.5))",
        "model.se.reduction": "choice(4, 8, 16, 32)",
    }


@pytest.mark.slow
def test_an_optuna_search_of_two_trials_finds_the_better_one(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m", "hydra/sweeper=optuna_se", "hydra.sweeper.n_trials=2", "model.se.reduction=choice(2,4)",
        *TINY, "trainer.epochs=1", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tops = [OmegaConf.load(path) for path in sweep_dir.glob("*/results.json")]
    configs = [OmegaConf.load(path) for path in sweep_dir.glob("*/.hydra/config.yaml")]
    assert len(tops) == 2 and {config.model.se.reduction for config in configs} <= {2, 4}
    assert all(0.001 <= config.optimizer.lr <= 0.5 for config in configs)
    found = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert found.best_value == max(top.best.val_top1 for top in tops)
