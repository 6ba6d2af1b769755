"""The reliability battery (docs/reliability.md): whatever a user feeds setrain, it answers with one
sentence saying what is wrong and how to fix it, exits 1, and leaves earlier runs as they were.

Each kind of mistake goes once through the real CLI; its variants are checked in-process, where the
CLI would only add seconds. docs/reliability.md lists every case with its message and its test,
including those tested beside the feature they guard (test_data.py, test_engine.py, ...).
"""

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from conftest import REPO_ROOT, TINY, assert_user_error, compose_config, run_cli
from setrain import config_checks
from setrain.config_checks import CONFIG_ERRORS, check_values, check_values_before_run, config_error_sentence
from setrain.data import build_data
from setrain.engine import train
from setrain.engine.checkpoint import load_checkpoint, load_model_state
from setrain.engine.rundir import lock_run_dir
from setrain.errors import SetrainError
from setrain.files import RunLog
from setrain.models import build_model, create_model
from setrain.testing import write_cifar10, write_cifar100, write_image_folder, write_stl10

CPU = torch.device("cpu")
MODELS = ", ".join(sorted(path.stem for path in (REPO_ROOT / "configs" / "model").glob("*.yaml")))


def assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 1 and exactly `message` on stderr, as `setrain: error: <message>`."""
    assert_user_error(result)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"setrain: error: {message}"], result.stderr


class RunsCode:
    def __init__(self, function, *args):
        self.call = function, args

    def __reduce__(self):
        return self.call  # unpickling calls function(*args)


def checked(*overrides: str, config_dir: Path = REPO_ROOT / "configs") -> None:
    """`check_values` on the config `python train.py <overrides>` composes, as inside the app."""
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            check_values(cfg)
        finally:
            HydraConfig.instance().cfg = None


# Config names and keys


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("model=se_resnet51", f"model=se_resnet51 is not in configs/model/; choose one of: {MODELS}."),
        ("trainer.epoch=3", "trainer.epoch is not a config key; the keys of trainer are: accumulate_grad_batches, "),
        ("trainer.epochs=ten", 'trainer.epochs="ten" must be an integer, like its default 10.'),
    ],
)
def test_unknown_name_misspelt_key_and_wrong_type_are_one_line(tmp_path, override, message):
    result = run_cli(override, "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_user_error(result, f"setrain: error: {message}")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra makes the run dir


@pytest.mark.parametrize(
    "override, message",
    [
        ("data=mnist", "data=mnist is not in configs/data/; choose one of: cifar10, cifar100, folder, imagenet, shapes, stl10."),
        ("optimizer=lamb", "optimizer=lamb is not in configs/optimizer/; choose one of: adam, adamw, sgd."),
        ("scheduler=onecycle", "scheduler=onecycle is not in configs/scheduler/; choose one of: cosine, multistep, plateau, step."),
        ("experiment=ablation_gates", "experiment=ablation_gates is not in configs/experiment/; choose one of: ablation_gate, "),
        ("model.se.ratio=4", "model.se.ratio is not a config key; the keys of model.se are: fused, gate, placement, reduction, squeeze, stages."),
        ("seeds=1", "seeds is not a config key; the keys at the top level are: data, model, optimizer, resume, resume_force, scheduler, seed, trainer."),
        ("trainer.epochs=[", "Could not parse the override 'trainer.epochs=[' (no viable alternative at input '['); see "),
    ],
)  # fmt: skip
def test_configs_hydra_cannot_compose_are_one_sentence(override, message):
    with pytest.raises(Exception) as raised:
        compose_config(override)
    sentence = config_error_sentence(raised.value)
    assert sentence.startswith(message) and "\n" not in sentence, sentence


@pytest.mark.slow
def test_config_file_that_is_not_valid_yaml_is_one_line(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - train\n  - _self_\ntrainer:\n  epochs: [1\n")
    config = ["--config-dir", str(tmp_path), "--config-name", "mine"]
    result = run_cli(*config, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line(
        result,
        f"Config file {tmp_path / 'mine.yaml'} is not valid YAML (expected ',' or ']', but got '<stream end>' at "
        "line 6, column 1, while parsing a flow sequence); fix its syntax.",
    )
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_utf8_is_named_in_one_sentence(tmp_path):
    (tmp_path / "mine.yaml").write_bytes(b"trainer:\n  epochs: 2  # caf\xe9\n")  # Latin-1, as an old editor saves
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"), pytest.raises(CONFIG_ERRORS) as raised:
        compose("mine")
    assert config_error_sentence(raised.value) == (
        f"Config file {tmp_path / 'mine.yaml'} is not UTF-8 text (byte 0xe9 at position 27); save it as UTF-8."
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: se_resnet20\n\tse: {}\n", "found character '\\t' that cannot start any token at line 2, column 1, while"),
        ("name: se_resnet20\nname: resnet20\n", "found duplicate key name at line 2, column 1, while constructing a mapping"),
        ("name: se_resnet20\nse: reduction: 4\n", "mapping values are not allowed here at line 2, column 14)"),
    ],
)  # fmt: skip
def test_group_file_that_is_not_valid_yaml_says_where(tmp_path, text, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text(text)
    (tmp_path / "train.yaml").write_text("defaults:\n  - model: mine\n")
    with pytest.raises(Exception) as raised, initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        compose("train")
    sentence = config_error_sentence(raised.value)
    assert sentence.startswith(f"Config file {tmp_path / 'model' / 'mine.yaml'} is not valid YAML ({message}"), sentence


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=0.5"], "seed=0.5 must be an integer, like its default 0."),
        (["data.batch_size=big"], 'data.batch_size="big" must be an integer, like its default 128.'),
        (["optimizer.nesterov=1"], "optimizer.nesterov=1 must be true or false, like its default true."),
        (["optimizer.lr=fast"], 'optimizer.lr="fast" must be a number, like its default 0.05.'),
        (["optimizer.lr=0"], "optimizer.lr=0 must be greater than 0, e.g. 0.05."),
        (["optimizer=adam", "optimizer.lr=-1e-3"], "optimizer.lr=-0.001 must be greater than 0, e.g. 0.001."),
        (["+trainer.epoch=3"], "trainer.epoch is not a config key; the keys of trainer are: accumulate_grad_batches, "),
        (["+foo.bar=1"], "foo is not a config key; the keys at the top level are: data, model, optimizer, "),
        (["trainer.epochs=${oops}"], "trainer.epochs cannot be resolved (Interpolation key 'oops' not found); fix its "),
        (["optimizer.momentum=1.5"], "optimizer.momentum=1.5 must be below 1, e.g. 0.9."),
        (["trainer.epochs=0"], "trainer.epochs=0 must be at least 1."),
        (["trainer.compile=maybe"], "trainer.compile='maybe' is not known; use true, false, auto or a torch.compile backend: "),
    ],
)
def test_values_hydra_accepts_but_training_cannot_use_are_refused(overrides, message):
    with pytest.raises(SetrainError) as raised:
        checked(*overrides)
    assert str(raised.value).startswith(message), raised.value


def test_the_defaults_compared_with_are_those_of_the_config_files_in_use(tmp_path):
    """check_values composes the defaults once per process and config search path."""
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    sgd = tmp_path / "configs" / "optimizer" / "sgd.yaml"
    sgd.write_text(sgd.read_text().replace("lr: 0.05", "lr: 0.2"))
    for config_dir, example in ((REPO_ROOT / "configs", "0.05"), (tmp_path / "configs", "0.2")):
        with pytest.raises(SetrainError, match=rf"^optimizer.lr=0 must be greater than 0, e.g. {example}\.$"):
            checked("optimizer.lr=0", config_dir=config_dir)


CHECKED_VALUES = [  # by the config checks
    ("trainer.checkpoint_every_n_steps=-5", "trainer.checkpoint_every_n_steps=-5 must be a positive integer."),
    ("trainer.early_stop_patience=0", "trainer.early_stop_patience=0 must be a positive integer."),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be a positive integer."),
    ("trainer.grad_clip_norm=-1", "trainer.grad_clip_norm=-1 must be positive, or null for no clipping."),
    ("trainer.channels_last=maybe", "trainer.channels_last='maybe' is not known; use auto, true or false."),
    ("data.pipeline=gpu", "data.pipeline='gpu' is not known; use auto, workers or device."),
    ("data.decode=cpu", "data.decode='cpu' is not known; use device (nvJPEG on CUDA) or workers (libjpeg-turbo)."),
    ("data.num_workers=-1", "data.num_workers=-1 must be 0 (load in the main process) or more."),
]
MODEL_VALUES = [
    ("model.se.placement=middle", "model.se.placement='middle' is not known; choose one of: standard, pre, post, identity."),
    ("model.se.squeeze=median", "model.se.squeeze='median' is not known; choose one of: avg, max."),
    ("model.se.fused=maybe", "model.se.fused='maybe' is not known; choose one of: auto, true, false."),
    ("model.se.stages=[7]", "model.se.stages=[7] names stages this network does not have; its residual stages are [2, 3, 4]"),
    ("model.pretrained=.", "The pretrained weights file . is a folder, not a file; set model.pretrained to a local"),
]
DATA_VALUES = [
    ("data.train_size=0", "The shapes training set has 0 images, fewer than one batch of 128; lower data.batch_size or"),
]


@pytest.mark.parametrize("override, message", CHECKED_VALUES + MODEL_VALUES + DATA_VALUES)
def test_values_that_cannot_work_are_one_sentence_before_training(override, message):
    """Trainer and loader values by the config checks (before the run dir exists); the model's and
    the dataset's by what builds them, as the run does first."""
    with pytest.raises(SetrainError) as raised:
        if (override, message) in CHECKED_VALUES:
            checked(override)
        elif override.startswith("model."):
            build_model(OmegaConf.to_container(compose_config(override).model, resolve=True), num_classes=10)
        else:
            build_data(OmegaConf.to_container(compose_config(override).data, resolve=True), CPU)
    assert str(raised.value).startswith(message), raised.value


def test_a_folder_given_as_the_checkpoint_is_one_sentence(tiny_config, tmp_path):
    with pytest.raises(SetrainError, match=r"^Checkpoint \. is a folder, not a file; pass resume=<path"):
        train(tiny_config("resume=."), tmp_path)


@pytest.mark.slow
def test_schedule_that_fails_when_stepped_is_refused_before_training(tmp_path):
    result = run_cli(*TINY, "scheduler.T_max=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line(
        result,
        "The learning-rate schedule fails at epoch 1 of 2 (ZeroDivisionError: integer modulo by zero); fix the "
        "scheduler values (scheduler.T_max=0, scheduler.warmup_epochs=0, scheduler.warmup_start_factor=0.1).",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheduler=step", "scheduler.step_size=0"], "fails at epoch 1 of 10 (ZeroDivisionError: integer modulo by zero); fix the scheduler values (scheduler.step_size=0, "),
        (["scheduler.warmup_epochs=2", "scheduler.warmup_start_factor=0"], "fails before the first epoch (ValueError: Starting multiplicative factor expected to be greater than 0 "),
        (["scheduler=plateau", "scheduler.factor=2"], "Could not build the scheduler torch.optim.lr_scheduler.ReduceLROnPlateau from configs/scheduler/: Factor should be < 1.0."),
        (["optimizer.momentum=-1"], "Could not build the optimizer torch.optim.SGD from configs/optimizer/: Invalid momentum value: -1"),
    ],
)  # fmt: skip
def test_schedule_and_optimizer_values_torch_refuses_are_refused_before_training(overrides, message):
    with pytest.raises(SetrainError) as raised:
        checked(*overrides)
    assert message in str(raised.value), raised.value


def test_values_are_checked_before_the_run_dir_exists_with_hydra_references_resolving(tmp_path):
    """ClaimRunDir checks before Hydra's run_job fills in the run dir: a value may still refer to it."""
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        for bad in (False, True):
            overrides = [f"hydra.run.dir={run_dir}", "data=cifar10", "data.root=${hydra:runtime.output_dir}/data"]
            cfg = compose("train", overrides=overrides + ["optimizer.lr=0"] * bad, return_hydra_config=True)
            try:
                if bad:
                    with pytest.raises(SetrainError, match="optimizer.lr=0 must be greater than 0"):
                        check_values_before_run(cfg)
                else:
                    check_values_before_run(cfg)
            finally:
                HydraConfig.instance().cfg = None
            assert OmegaConf.is_missing(cfg.hydra.runtime, "output_dir")  # Hydra's config untouched
    assert not run_dir.exists()


def test_values_of_every_kind_a_key_takes_pass():
    checked("trainer.precision=bf16", "trainer.compile=aot_eager", "optimizer.lr=1", "model.se.stages=[4,5]")
    checked("experiment=cifar", "model=se_resnet56", "+model.width_mult=0.5")  # checked by the model
    checked("scheduler=plateau", "trainer.epochs=30")
    checked("scheduler=multistep", "scheduler.milestones=[1,2]", "scheduler.warmup_epochs=3")


# Values


@pytest.mark.parametrize(
    "options, message",
    [
        ({"image_size": 4}, "data.image_size=4 is too small to draw shapes; use 16 or more."),
        ({"val_split": 0.1}, "Dataset 'shapes' does not take the option(s) val_split; it takes: image_size, train_size, val_size, seed, batch_size, num_workers, pipeline, decode, repeated_augment."),
    ],
)  # fmt: skip
def test_dataset_options_that_cannot_work_are_refused_before_loading(options, message):
    """Every model runs on the smallest images the datasets make (8 px)."""
    with pytest.raises(SetrainError) as raised:
        build_data({"name": "shapes", "batch_size": 16, "num_workers": 0, "image_size": 16, **options}, CPU)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "data.batch_size=0 is too small: BatchNorm needs at least 2 images per batch to train; use 2 or more."),
        ({"batch_size": 1}, "data.batch_size=1 is too small"),
        ({"repeated_augment": 0}, "data.repeated_augment=0 must be 1 (off) or more"),
    ],
)  # fmt: skip
def test_loader_values_that_cannot_work_are_refused(options, message):
    """With 1 image per batch BatchNorm fails on a 1x1 feature map (a 32 px image deep in ResNet-50)."""
    with pytest.raises(SetrainError) as raised:
        config_checks.check_data_options({"name": "shapes", "batch_size": 16, "num_workers": 0, **options})
    assert str(raised.value).startswith(message)


def test_checkpoint_for_another_number_of_classes_says_so():
    state = create_model("se_resnet20", num_classes=10).state_dict()
    with pytest.raises(SetrainError) as raised:
        load_model_state(create_model("se_resnet20", num_classes=4), state, "run/last.pt")
    assert str(raised.value) == (
        "Checkpoint run/last.pt classifies 10 classes but this dataset has 4 (shape: fc.weight (10, 64) vs "
        "(4, 64), fc.bias (10,) vs (4,)); resume on the data it was trained on, or fine-tune it in a new run "
        "with model.pretrained=run/last.pt."
    )


# Data


def test_stl10_without_class_names_file_still_has_its_ten_classes(tmp_path):
    (write_stl10(tmp_path) / "class_names.txt").unlink()
    data = build_data({"name": "stl10", "batch_size": 4, "num_workers": 0, "root": str(tmp_path)}, CPU)
    assert data.num_classes == 10


def test_labels_outside_the_classes_are_refused(tmp_path):
    folder = write_stl10(tmp_path)
    (folder / "train_y.bin").write_bytes(bytes([1, 11] * 10))  # STL10 stores 1..10, torchvision subtracts 1
    with pytest.raises(SetrainError, match=r"hold labels 0\.\.10, outside its classes 0\.\.9; replace them"):
        build_data({"name": "stl10", "batch_size": 4, "num_workers": 0, "root": str(tmp_path)}, CPU)


@pytest.mark.slow
def test_dataset_file_whose_pickle_would_run_code_is_refused_through_the_cli(tmp_path):
    marker, batch = tmp_path / "code_ran", write_cifar10(tmp_path / "data") / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": RunsCode(open, str(marker), "w"), "labels": [0]}))
    pickle.loads(batch.read_bytes())
    assert marker.is_file()  # the payload works where a loader trusts the file
    marker.unlink()
    data = ["data=cifar10", f"data.root={tmp_path / 'data'}", "trainer.device=cpu"]
    result = run_cli(*data, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line(
        result,
        f"CIFAR-10 file {batch} holds pickled Python code (io.open), which the official files do not, so it is "
        "not read; replace it with a fresh copy of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.",
    )
    assert not marker.exists()


def test_cifar100_metadata_whose_pickle_would_run_code_is_refused(tmp_path):
    meta = write_cifar100(tmp_path) / "meta"
    meta.write_bytes(pickle.dumps({"fine_label_names": RunsCode(os.open, str(tmp_path / "code_ran"), os.O_CREAT)}))
    with pytest.raises(SetrainError, match=rf"CIFAR-100 file {meta} holds pickled Python code \(posix.open\)"):
        build_data({"name": "cifar100", "batch_size": 4, "num_workers": 0, "root": str(tmp_path)}, CPU)
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_batches_of_arrays_load_at_every_pickle_protocol(tmp_path, protocol):
    """The official files are Python 2 pickles (protocol 2); a re-pickled copy names other numpy functions."""
    for batch in write_cifar10(tmp_path).iterdir():
        batch.write_bytes(pickle.dumps(pickle.loads(batch.read_bytes()), protocol=protocol))
    data = build_data({"name": "cifar10", "batch_size": 4, "num_workers": 0, "root": str(tmp_path)}, CPU)
    assert len(data.train_loader.dataset) == 40 and data.classes[0] == "airplane"


def test_cifar_batch_that_is_not_a_dict_is_refused(tmp_path):
    (write_cifar10(tmp_path) / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(SetrainError, match=r"Could not read CIFAR-10 .* \(TypeError: .*not in the official format"):
        build_data({"name": "cifar10", "batch_size": 4, "num_workers": 0, "root": str(tmp_path)}, CPU)


@pytest.mark.slow
def test_link_back_up_an_image_tree_is_refused_through_the_cli(tmp_path):
    write_image_folder(tmp_path / "tree" / "train", ["cat", "dog"], per_class=4)
    (tmp_path / "tree" / "train" / "cat" / "up").symlink_to("..")
    data = ["data=folder", f"data.root={tmp_path / 'tree'}", "data.val_fraction=0.25", "data.batch_size=4"]
    result = run_cli(*data, "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    train = tmp_path / "tree" / "train"
    assert_one_line(
        result,
        f"{train} and {train}/cat/up are the same folder through a symbolic link, so its images would be read "
        "twice, possibly under another class or in both train/ and val/; remove the link, or copy the folder it "
        "should add.",
    )


FOLDER = {"name": "folder", "val_fraction": 0.5, "batch_size": 2, "num_workers": 0}


@pytest.mark.parametrize("link, target", [("a/more", "../b"), ("b/deep/up", "../../.."), ("a/again", "../a")])
def test_links_that_loop_or_repeat_a_folder_of_the_tree_are_refused(tmp_path, link, target):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=2)
    (tmp_path / "train" / "b" / "deep").mkdir()
    (tmp_path / "train" / link).symlink_to(target)
    with pytest.raises(SetrainError, match="are the same folder through a symbolic link"):
        build_data({**FOLDER, "root": str(tmp_path)}, CPU)


@pytest.mark.parametrize(
    "link, target, second",
    [
        ("train/a/copy.png", "train/b/b_0.png", "image"),  # one image under two classes
        ("val/a/seen.png", "train/a/a_0.png", "image"),  # a training image validated on
        ("val", "train", "folder"),  # val/ that is train/
        ("val/b", "train/b", "folder"),
    ],
)
def test_links_to_what_train_or_val_already_hold_are_refused(tmp_path, link, target, second):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=2)
    if link != "val":
        write_image_folder(tmp_path / "val", ["a"], per_class=1, seed=1)
    (tmp_path / link).symlink_to(tmp_path / target)
    with pytest.raises(SetrainError) as raised:
        build_data({**FOLDER, "val_fraction": 0.0, "root": str(tmp_path)}, CPU)
    first, rest = str(raised.value).split(" and ", 1)
    assert {first, rest.split(" are ")[0]} == {str(tmp_path / target), str(tmp_path / link)}
    assert f" are the same {second} through a symbolic link" in rest


def test_links_to_images_outside_the_tree_are_followed_once(tmp_path):
    write_image_folder(tmp_path / "elsewhere", ["a"], per_class=2)
    write_image_folder(tmp_path / "tree" / "train", ["a", "b"], per_class=2)
    (tmp_path / "tree" / "train" / "a" / "linked.png").symlink_to(tmp_path / "elsewhere" / "a" / "a_0.png")
    dataset = build_data({**FOLDER, "root": str(tmp_path / "tree")}, CPU).train_loader.dataset.dataset
    assert sorted(dataset.targets) == [0] * 3 + [1] * 2


def test_links_to_folders_outside_the_tree_are_followed_once(tmp_path):
    write_image_folder(tmp_path / "elsewhere", ["a", "b"], per_class=3)
    write_image_folder(tmp_path / "tree" / "train", ["a"], per_class=2)
    (tmp_path / "tree" / "train" / "a" / "more").symlink_to(tmp_path / "elsewhere" / "a")
    (tmp_path / "tree" / "train" / "b").symlink_to(tmp_path / "elsewhere" / "b")
    dataset = build_data({**FOLDER, "root": str(tmp_path / "tree")}, CPU).train_loader.dataset.dataset
    assert sorted(dataset.targets) == [0] * 5 + [1] * 3


# Checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("function, args", [(open, ("w",)), (os.open, (os.O_CREAT,))])  # unsupported, blocked
def test_checkpoint_whose_pickle_would_run_code_is_refused_through_the_cli(tmp_path, function, args):
    marker, evil = tmp_path / "code_ran", tmp_path / "evil.pt"
    torch.save({"model": RunsCode(function, str(marker), *args), "optimizer": {}, "scheduler": {}, "epoch": 1}, evil)
    torch.load(evil, weights_only=False)
    assert marker.is_file()  # the payload works where a loader trusts the file
    marker.unlink()
    result = run_cli(*TINY, f"resume={evil}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line(
        result,
        f"Checkpoint {evil} holds pickled Python objects, which could run code, so it is not loaded; save "
        "tensors only, e.g. torch.save(model.state_dict(), path).",
    )
    assert not marker.exists()


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_another_model_is_refused_unless_forced(tiny_config, tmp_path):
    train(tiny_config("model=resnet20", "trainer.epochs=1"), tmp_path / "plain")
    checkpoint = tmp_path / "plain" / "checkpoints" / "last.pt"
    with pytest.raises(SetrainError) as raised:
        train(tiny_config(f"resume={checkpoint}"), tmp_path / "se")
    assert str(raised.value) == (
        f"Checkpoint {checkpoint} was trained with model.name=resnet20 (not se_resnet20); resume with the same "
        "model and data, or pass resume_force=true to continue it anyway."
    )
    with pytest.raises(SetrainError, match=r"does not fit this model \(missing: .*se\.excitation"):
        train(tiny_config(f"resume={checkpoint}", "resume_force=true"), tmp_path / "se")


# Output


@pytest.mark.slow
def test_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    run_dir = tmp_path / "file" / "run"
    result = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line(
        result,
        f"Cannot write into the run directory {run_dir} (Not a directory); choose a writable place with "
        "hydra.run.dir=<path> (hydra.sweep.dir=<path> with -m).",
    )


def fake_run(run_dir, *overrides):
    """A run dir as a finished run leaves it, without training: config and checkpoint."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(*TINY, *overrides)))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"the weights of an earlier run")
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_a_run_dir_holding_a_run_is_only_continued_with_its_model_and_data(tmp_path):
    run_dir = tmp_path / "run"
    before = fake_run(run_dir)
    again = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line(
        again,
        f"The run directory {run_dir} already holds a run (checkpoints/last.pt); continue it with resume=auto, "
        "or start a new run in another hydra.run.dir.",
    )
    other = run_cli(*TINY, "model=resnet20", "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line(
        other,
        f"The run in {run_dir} was trained with model.name=se_resnet20 (not resnet20); resume with the same model "
        "and data, or pass resume_force=true to continue it anyway.",
    )
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_a_refused_run_leaves_no_run_dir_and_what_was_there_as_it_was(tmp_path):
    """Refused after Hydra wrote .hydra/ and train.log: the default run dir (outputs/<date>/<time>_*)
    goes; in a dir that existed, only what the run added goes and .hydra/ is put back."""
    refused = run_cli(*TINY, "data.batch_size=1000", cwd=tmp_path)
    assert_user_error(refused, "fewer than one batch of 1000")
    assert list(tmp_path.iterdir()) == []

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = run_cli(*TINY, "model.se.reduction=-4", f"hydra.run.dir={mine}", cwd=tmp_path)
    assert_user_error(refused, "SE reduction ratio r=-4 is invalid")
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]

    run_dir = tmp_path / "run"
    before = fake_run(run_dir, "optimizer.lr=0.5")
    (run_dir / "train.log").write_text("the earlier run's log\n")
    before[run_dir / "train.log"] = b"the earlier run's log\n"
    resumed = run_cli(*TINY, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # last.pt is no checkpoint
    assert_user_error(resumed, str(run_dir / "checkpoints" / "last.pt"))
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_a_refused_sweep_job_leaves_no_job_dir_and_the_others_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", *TINY, "trainer.epochs=1", "model.se.reduction=-4,8", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert_user_error(result, "SE reduction ratio r=-4 is invalid", "1 job(s) failed: 0")
    assert not list(sweep_dir.glob("0_*"))
    assert [path.name for path in sweep_dir.glob("1_*/results.json")] == ["results.json"]


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_config, tmp_path):
    train(tiny_config("trainer.epochs=1"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    previous = last.read_bytes()
    (tmp_path / "checkpoints" / "last.pt.tmp").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(SetrainError) as raised:
        train(tiny_config("resume=auto"), tmp_path)
    assert str(raised.value) == (
        f"The disk is full: could not write checkpoint {last} (the previous last.pt is intact); free space on "
        f"it, then continue with resume=auto hydra.run.dir={tmp_path}."
    )
    assert last.read_bytes() == previous and load_checkpoint(last)["epoch"] == 1
    assert sorted(path.name for path in last.parent.iterdir()) == ["best.pt", "last.pt"]


def test_a_log_that_cannot_be_written_is_one_error_and_then_silent(tmp_path):
    (tmp_path / "train.log").symlink_to("/dev/full")  # every write: ENOSPC
    handler = RunLog(tmp_path / "train.log")
    logger = logging.getLogger("test_run_log")
    logger.addHandler(handler)
    try:
        with pytest.raises(SetrainError, match=r"Could not write the run's log .*train.log \(No space left on device\); free"):
            logger.warning("epoch 1")
        logger.warning("epoch 2")  # the error is on its way out: nothing more is raised or printed
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.slow
def test_a_full_disk_under_train_log_stops_the_resumed_run_in_one_line_and_keeps_last_pt(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    last = run_dir / "checkpoints" / "last.pt"
    previous = last.read_bytes()
    (run_dir / "train.log").unlink()
    (run_dir / "train.log").symlink_to("/dev/full")
    result = run_cli(*TINY, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line(
        result,
        f"Could not write the run's log {run_dir / 'train.log'} (No space left on device); free space or fix the "
        f"folder, then continue with resume=auto hydra.run.dir={run_dir}",
    )
    assert last.read_bytes() == previous


# Runs


@pytest.mark.slow
def test_a_second_run_in_the_same_dir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    first = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), *TINY, "data.train_size=4096", "trainer.epochs=50",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".hydra" / "config.yaml").exists():  # written after the lock is taken
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = run_cli(*TINY, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert first.poll() is None, "the first run ended before the second one started"
        assert_one_line(
            second,
            f"The run directory {run_dir} is in use by another setrain process; wait for it to end, or choose "
            "another hydra.run.dir.",
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    os.close(lock_run_dir(run_dir))  # the kernel released the killed process's lock


def test_the_run_dir_lock_excludes_a_second_holder_until_the_first_closes(tmp_path):
    descriptor = lock_run_dir(tmp_path / "run")
    with pytest.raises(SetrainError, match="is in use by another setrain process"):
        lock_run_dir(tmp_path / "run")
    os.close(descriptor)
    os.close(lock_run_dir(tmp_path / "run"))
    assert [path.name for path in tmp_path.iterdir()] == ["run"] and not any((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *TINY, "model.se.reduction=32", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "setrain.errors.SetrainError: SE reduction ratio r=32 is too large" in result.stderr
