"""Train an SE network: `python train.py model=se_resnet50 data=stl10` (configs/ lists the options)."""

import sys

import hydra
from omegaconf import DictConfig

from setrain.cli import run, run_training


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(run(main))
