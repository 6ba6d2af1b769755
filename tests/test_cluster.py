"""configs/hydra/: an Optuna search through the real CLI, with its plugin (the `cluster` extra).

Skipped where the plugins are not installed: pip install 'setrain[cluster]'.
"""

import pytest
from omegaconf import OmegaConf

from conftest import TINY, run_cli


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
