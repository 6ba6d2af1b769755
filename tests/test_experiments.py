"""Named experiments (configs/experiment/): the paper's recipe and its ablations as multiruns."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from conftest import REPO_ROOT, TINY, compose_config, run_cli

ABLATIONS = {
    "ablation_reduction": ("model.se.reduction", "2,4,8,16,32"),
    "ablation_squeeze": ("model.se.squeeze", "avg,max"),
    "ablation_gate": ("model.se.gate", "sigmoid,tanh,relu"),
    "ablation_stages": ("model.se.stages", "[],[2],[3],[4],null"),
    "ablation_placement": ("model.se.placement", "standard,pre,post,identity"),
}


def test_paper_recipe():
    cfg = compose_config("experiment=paper_imagenet")
    assert (cfg.model.name, cfg.data.name, cfg.data.image_size) == ("se_resnet50", "imagenet", 224)
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.lr * 1024 / cfg.data.batch_size == 0.6
    assert (cfg.scheduler.step_size, cfg.scheduler.gamma, cfg.trainer.epochs) == (30, 0.1, 100)


@pytest.mark.parametrize("experiment", sorted(ABLATIONS))
def test_each_ablation_sweeps_one_se_switch_of_se_resnet50_on_imagenet(experiment):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    key, values = ABLATIONS[experiment]
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == {key: values}
    assert (cfg.model.name, cfg.data.name) == ("se_resnet50", "imagenet")


@pytest.mark.slow
def test_an_ablation_multirun_trains_one_job_per_setting(tmp_path):
    """The same experiment on a small model and the offline data, as a smoke test of the sweep."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m", "experiment=ablation_gate", "model=se_resnet20", "data=shapes", *TINY,
        "trainer.epochs=1", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    gates = sorted(
        OmegaConf.load(path.parent / ".hydra" / "config.yaml").model.se.gate
        for path in sweep_dir.glob("*/results.json")
    )
    assert gates == ["relu", "sigmoid", "tanh"]


def test_a_misspelt_experiment_is_refused_not_ignored():
    with pytest.raises(MissingConfigException, match="experiment/ablation_gates"):
        compose_config("experiment=ablation_gates")
