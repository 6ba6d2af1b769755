"""Reading a finished run back (setrain/trained.py): the weights, the data, and the user errors."""

import re

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, write_checkpoint
from setrain.errors import SetrainError
from setrain.models import create_model
from setrain.trained import load_trained_model, trained_data


def command_config(checkpoint, *overrides: str):
    return compose_config(f"checkpoint={checkpoint}", "device=cpu", *overrides, config_name="evaluate")


def ema_weights():
    torch.manual_seed(1)
    return create_model("se_resnet20", num_classes=10).state_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """{has EMA weights: (its path, its content)}: two checkpoints the module's tests only read."""
    root = tmp_path_factory.mktemp("checkpoints")
    plain, with_ema = root / "plain" / "checkpoints" / "best.pt", root / "ema" / "checkpoints" / "best.pt"
    return {False: (plain, write_checkpoint(plain)), True: (with_ema, write_checkpoint(with_ema, ema=ema_weights()))}


@pytest.mark.parametrize("weights, has_ema, loaded", [("auto", True, "ema"), ("auto", False, "model"),
                                                      ("model", True, "model"), ("ema", True, "ema")])  # fmt: skip
def test_the_weights_asked_for_are_loaded(checkpoints, tmp_path, weights, has_ema, loaded):
    path, state = checkpoints[has_ema]
    trained = load_trained_model(command_config(path, f"weights={weights}"), "evaluate")
    assert trained.weights == loaded and trained.num_classes == 10 and trained.name == "se_resnet20"
    for key, value in trained.model.state_dict().items():
        torch.testing.assert_close(value, state[loaded][key], rtol=0, atol=0)
    assert trained.output_dir(None, "evaluation") == path.parent.parent / "evaluation"
    assert trained.output_dir(str(tmp_path / "elsewhere"), "evaluation") == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    "override, message",
    [
        ("weights=ema", "has no EMA weights (its run did not set trainer.ema_decay); use weights=model"),
        ("weights=best", "weights=best is not one of auto, model, ema"),
    ],
)
def test_weights_that_are_not_there_are_refused(checkpoints, override, message):
    path, _ = checkpoints[False]
    with pytest.raises(SetrainError, match=re.escape(message)):
        load_trained_model(command_config(path, override), "evaluate")


def test_unreadable_checkpoints_are_one_sentence_naming_the_command(tmp_path):
    with pytest.raises(SetrainError, match=re.escape("No checkpoint given; pass checkpoint=<run dir>/checkpoints/")):
        load_trained_model(compose_config(config_name="evaluate"), "evaluate")
    with pytest.raises(SetrainError, match="does not exist; pass checkpoint="):
        load_trained_model(command_config(tmp_path / "nope.pt"), "evaluate")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SetrainError, match=r"cannot be read \(.*evaluate another one, such as checkpoints/last.pt"):
        load_trained_model(command_config(corrupt), "evaluate")


def test_data_is_the_checkpoints_own_changed_by_keys_or_replaced_by_a_file(checkpoints):
    path, _ = checkpoints[False]
    trained = load_trained_model(command_config(path), "evaluate")
    cpu = torch.device("cpu")

    data, data_cfg = trained_data(trained, None, cpu)
    assert OmegaConf.to_container(data_cfg) == trained.config["data"]
    assert len(data.val_loader.dataset) == 32 and data.classes[:2] == ["disk", "ring"]

    changed = compose_config(f"checkpoint={path}", "+data.val_size=8", config_name="evaluate").data
    data, data_cfg = trained_data(trained, changed, cpu)
    assert len(data.val_loader.dataset) == 8 and data_cfg.image_size == 16  # the rest is the checkpoint's

    replaced = compose_config(f"checkpoint={path}", "data=shapes", "data.train_size=128", "data.val_size=16",
                              config_name="evaluate").data  # fmt: skip
    data, data_cfg = trained_data(trained, replaced, cpu)
    assert data_cfg.image_size == 32 and data_cfg.batch_size == 128  # configs/data/shapes.yaml, not the checkpoint's 16
    assert next(iter(data.val_loader))[0].shape == (16, 3, 32, 32)


def test_data_with_other_classes_than_the_classifier_is_refused(tmp_path):
    path = tmp_path / "best.pt"
    state = write_checkpoint(path)
    state["model"] = create_model("se_resnet20", num_classes=5).state_dict()
    torch.save(state, path)
    trained = load_trained_model(command_config(path), "evaluate")
    with pytest.raises(SetrainError, match="has 10 classes but the checkpoint's classifier has 5; use the dataset"):
        trained_data(trained, None, torch.device("cpu"))
