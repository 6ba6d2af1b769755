"""Named experiments (configs/experiment/): the paper's recipe and its ablations as multiruns."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO_ROOT, TINY, compose_config, run_cli
from setrain.engine.optim import build_optimizer

ABLATIONS = {
    "ablation_reduction": ("model.se.reduction", "2,4,8,16,32"),
    "ablation_squeeze": ("model.se.squeeze", "avg,max"),
    "ablation_gate": ("model.se.gate", "sigmoid,tanh,relu"),
    "ablation_stages": ("model.se.stages", "[],[2],[3],[4],null"),
    "ablation_placement": ("model.se.placement", "standard,pre,post,identity"),
}


@pytest.mark.parametrize("batch, accumulate, processes, lr", [(256, 1, 1, 0.15), (256, 1, 8, 1.2), (64, 4, 1, 0.15)])
def test_paper_lr_scales_linearly_with_the_batch_actually_used(batch, accumulate, processes, lr):
    cfg = compose_config("experiment=paper_imagenet", f"data.batch_size={batch}")
    optimizer = build_optimizer(cfg.optimizer, nn.Linear(2, 2), batch * accumulate * processes)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)


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
