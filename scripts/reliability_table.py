"""Write docs/reliability.md: every mistake of the reliability battery run through its command
(`python train.py`, or the script a case names), with the message it printed and the test that
holds it to that (about 6 minutes on 2 cores).

    python scripts/reliability_table.py              # writes docs/reliability.md
    python scripts/reliability_table.py --no-write   # prints only

Each case runs in a fresh folder and paths are shown relative to it, as if typed in the project
directory; the messages are what the CLI printed, never written by hand. A case whose test is
missing from tests/ stops the script, so the table cannot cite a test that does not exist.
"""

import argparse
import os
import pickle
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from setrain.testing import write_cifar10, write_image_folder, write_stl10

REPO_ROOT = Path(__file__).resolve().parents[1]

DOCS = REPO_ROOT / "docs" / "reliability.md"
# Small enough that the runs a case needs first take seconds (configs/debug/tiny.yaml); not shown in the table.
TINY = ["debug=tiny"]
FOLDER = ["data=folder", "data.image_size=16", "data.val_fraction=0.25", "data.batch_size=4", "data.num_workers=0"]


@dataclass
class Case:
    what: str
    args: list[str]
    test: str  # file::function in tests/
    setup: Callable[[Path], None] | None = None
    hidden: list[str] = field(default_factory=list)  # run with these too, not shown
    env: dict[str, str] = field(default_factory=dict)
    program: str = "train.py"  # or "-m <module>", e.g. "-m setrain.evaluate"
    left: bool = False  # also say what the command left in the folder (files new or changed since the setup)
    runner: Callable[[Path, "Case"], subprocess.CompletedProcess] | None = None  # instead of `cli`


def cli(root: Path, *args: str, env: dict | None = None, program="train.py") -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    device = ["trainer.device=cpu"] if program == "train.py" else []  # the last value wins
    entry = program.split() if program.startswith("-m ") else [str(REPO_ROOT / program)]
    command = [sys.executable, *entry, *device, *args]
    return subprocess.run(command, cwd=root, env={**environment, **(env or {})}, capture_output=True, text=True)


def trained(*args: str, run_dir: str = "run") -> Callable[[Path], None]:
    """A setup that trains a run (`args`, e.g. TINY) into `run_dir` first."""

    def setup(root: Path) -> None:
        result = cli(root, *args, f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr

    return setup


def then(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        for step in setups:
            step(root)

    return setup


def folder_tree(layout: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        tree = root / "datasets" / "folder"
        if layout == "flat":
            write_image_folder(tree, ["train"], per_class=2)
        else:
            write_image_folder(tree / "train", ["cat", "dog", "fox", "owl"], per_class=6)
        if layout == "empty class":
            for image in (tree / "train" / "owl").iterdir():
                image.unlink()
        if layout == "corrupt image":
            (tree / "train" / "dog" / "dog_2.png").write_bytes(b"not a png")

    return setup


def truncate(path: str, keep: float = 0.5) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        file = root / path
        file.write_bytes(file.read_bytes()[: int(file.stat().st_size * keep)])

    return setup


def write(path: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda root: make(root / path)


class RunsCode:
    """Unpickling it calls function(*args), which makes the file `code_ran`."""

    def __init__(self, function, *args):
        self.call = function, args

    def __reduce__(self):
        return self.call


def log_to_full_disk(root: Path) -> None:
    (root / "run" / "train.log").unlink()
    (root / "run" / "train.log").symlink_to("/dev/full")  # every write: ENOSPC


def drop_class(root: Path) -> None:
    for image in (root / "datasets" / "folder" / "train" / "owl").iterdir():
        image.unlink()
    (root / "datasets" / "folder" / "train" / "owl").rmdir()


CASES = {
    "Config names and keys": [
        Case("unknown model", ["model=se_resnet51"], "test_reliability.py::test_unknown_name_misspelt_key_and_wrong_type_are_one_line"),
        Case("unknown dataset", ["data=mnist"], "test_reliability.py::test_configs_hydra_cannot_compose_are_one_sentence"),
        Case("unknown optimizer", ["optimizer=lamb"], "test_reliability.py::test_configs_hydra_cannot_compose_are_one_sentence"),
        Case("unknown scheduler", ["scheduler=onecycle"], "test_reliability.py::test_configs_hydra_cannot_compose_are_one_sentence"),
        Case("unknown experiment", ["experiment=ablation_gates"], "test_reliability.py::test_configs_hydra_cannot_compose_are_one_sentence"),
        Case("misspelt key", ["trainer.epoch=3"], "test_reliability.py::test_unknown_name_misspelt_key_and_wrong_type_are_one_line"),
        Case("misspelt SE option", ["model.se.ratio=4"], "test_reliability.py::test_configs_hydra_cannot_compose_are_one_sentence"),
        Case("key added with `+` that nothing reads", ["+trainer.epoch=3"], "test_reliability.py::test_values_hydra_accepts_but_training_cannot_use_are_refused"),
        Case("option the dataset does not take", ["+data.val_split=0.1"], "test_reliability.py::test_loader_values_that_cannot_work_are_refused"),
        Case("SE option on a model without SE", ["model=resnet20", "+model.se.reduction=8"], "test_models.py::test_plain_twin_refuses_se_options"),
        Case("override that does not parse", ["trainer.epochs=["], "test_reliability.py::test_configs_hydra_cannot_compose_are_one_sentence"),
        Case("own config file that is not valid YAML", ["--config-dir", ".", "--config-name", "mine"], "test_reliability.py::test_config_file_that_is_not_valid_yaml_is_one_line", setup=write("mine.yaml", lambda path: path.write_text("defaults:\n  - train\n  - _self_\ntrainer:\n  epochs: [1\n"))),
        Case("own config file that is not UTF-8 (a Latin-1 comment)", ["--config-dir", ".", "--config-name", "mine"], "test_reliability.py::test_config_file_that_is_not_utf8_is_named_in_one_sentence", setup=write("mine.yaml", lambda path: path.write_bytes(b"defaults:\n  - train\n  - _self_\ntrainer:\n  epochs: 2  # caf\xe9\n"))),
        Case("`${...}` that does not resolve", ["trainer.epochs=${oops}"], "test_reliability.py::test_values_hydra_accepts_but_training_cannot_use_are_refused"),
    ],
    "Values": [
        Case("value of the wrong type", ["trainer.epochs=ten"], "test_reliability.py::test_unknown_name_misspelt_key_and_wrong_type_are_one_line"),
        Case("zero learning rate", ["optimizer.lr=0"], "test_reliability.py::test_values_hydra_accepts_but_training_cannot_use_are_refused"),
        Case("negative learning rate", ["optimizer.lr=-0.1"], "test_reliability.py::test_values_hydra_accepts_but_training_cannot_use_are_refused"),
        Case("schedule that fails when stepped (a cosine period of 0 epochs)", ["scheduler.T_max=0"], "test_reliability.py::test_schedule_that_fails_when_stepped_is_refused_before_training"),
        Case("scheduler value torch refuses", ["scheduler=step", "scheduler.step_size=0"], "test_reliability.py::test_schedule_and_optimizer_values_torch_refuses_are_refused_before_training"),
        Case("zero epochs", ["trainer.epochs=0"], "test_engine.py::test_user_errors_are_one_clear_sentence"),
        Case("batch size 0 or 1", ["data.batch_size=1"], "test_reliability.py::test_loader_values_that_cannot_work_are_refused"),
        Case("image size too small (every model runs from 8 px, with 2 or more images per batch)", ["data.image_size=4"], "test_reliability.py::test_loader_values_that_cannot_work_are_refused"),
        Case("reduction ratio of zero", ["model.se.reduction=0"], "test_engine.py::test_user_errors_are_one_clear_sentence"),
        Case("reduction ratio larger than the narrowest SE layer", ["model.se.reduction=32"], "test_cli.py::test_user_error_is_one_line_without_traceback"),
        Case("unknown SE gate", ["model.se.gate=softmax"], "test_ablations.py::test_unknown_squeeze_or_gate_lists_the_choices"),
        Case("CUDA without a GPU", ["trainer.device=cuda"], "test_engine.py::test_cuda_without_a_gpu_is_a_user_error", hidden=TINY),
        Case("unknown device", ["trainer.device=tpu"], "test_engine.py::test_user_errors_are_one_clear_sentence"),
        Case("unknown precision", ["trainer.precision=8"], "test_training_options.py::test_option_values_that_cannot_work_are_refused"),
        Case("unknown torch.compile backend", ["trainer.compile=maybe"], "test_reliability.py::test_values_hydra_accepts_but_training_cannot_use_are_refused"),
        Case("momentum of 1 or more (torch accepts it; the steps grow without bound)", ["optimizer.momentum=1.5"], "test_reliability.py::test_values_hydra_accepts_but_training_cannot_use_are_refused"),
        Case("step checkpoints every -5 steps", ["trainer.checkpoint_every_n_steps=-5"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("early stopping after 0 epochs", ["trainer.early_stop_patience=0"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("logging every 0 steps", ["trainer.log_every_n_steps=0"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("negative gradient clipping norm", ["trainer.grad_clip_norm=-1"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("unknown channels_last value", ["trainer.channels_last=maybe"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("unknown SE placement", ["model.se.placement=middle"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("unknown squeeze", ["model.se.squeeze=median"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("unknown fused SE value", ["model.se.fused=maybe"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("SE in a stage the network does not have", ["model.se.stages=[7]"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("EMA decay above 1", ["trainer.ema_decay=1.5"], "test_training_options.py::test_option_values_that_cannot_work_are_refused", hidden=TINY),
        Case("label smoothing of 1 (every target uniform)", ["trainer.label_smoothing=1"], "test_training_options.py::test_option_values_that_cannot_work_are_refused", hidden=TINY),
        Case("gradients accumulated over 0 batches", ["trainer.accumulate_grad_batches=0"], "test_training_options.py::test_option_values_that_cannot_work_are_refused", hidden=TINY),
        Case("negative MixUp alpha", ["trainer.mixup_alpha=-1"], "test_training_options.py::test_mixup_and_cutmix_train_on_soft_targets", hidden=TINY),
        Case("unknown data pipeline", ["data.pipeline=gpu"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("unknown JPEG decoder", ["data.decode=cpu"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("negative number of loader workers", ["data.num_workers=-1"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("empty training set", ["data.train_size=0"], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case(
            "resume on data with another number of classes",
            [*FOLDER, "resume=auto", "hydra.run.dir=run"],
            "test_reliability.py::test_checkpoint_for_another_number_of_classes_says_so",
            setup=then(folder_tree("4 classes"), trained(*FOLDER, "trainer.epochs=1"), drop_class),
            hidden=["trainer.epochs=2"],
        ),
    ],
    "Data": [
        Case("missing dataset folder", ["data=imagenet"], "test_cli.py::test_missing_imagenet_is_one_line_naming_the_folder"),
        Case("missing dataset files", ["data=cifar10"], "test_data.py::test_missing_dataset_says_where_and_how"),
        Case("wrong layout (images not in class folders)", ["data=folder"], "test_data.py::test_folder_layout_errors_name_the_path_and_the_fix", setup=folder_tree("flat")),
        Case("empty class folder", ["data=folder", "data.val_fraction=0.25"], "test_data.py::test_folder_layout_errors_name_the_path_and_the_fix", setup=folder_tree("empty class")),
        Case("no validation folder", ["data=folder"], "test_data.py::test_folder_layout_errors_name_the_path_and_the_fix", setup=folder_tree("4 classes")),
        Case("folder link back up the image tree (its class would take every image)", FOLDER, "test_reliability.py::test_link_back_up_an_image_tree_is_refused_through_the_cli", setup=then(folder_tree("4 classes"), lambda root: (root / "datasets/folder/train/cat/up").symlink_to(".."))),
        Case("image linked into a second class (one image, two labels)", FOLDER, "test_reliability.py::test_links_to_what_train_or_val_already_hold_are_refused", setup=then(folder_tree("4 classes"), lambda root: (root / "datasets/folder/train/cat/twin.png").symlink_to(root / "datasets/folder/train/dog/dog_0.png"))),
        Case("val/ a link to train/ (it would validate on training images)", [arg for arg in FOLDER if "val_fraction" not in arg], "test_reliability.py::test_links_to_what_train_or_val_already_hold_are_refused", setup=then(folder_tree("4 classes"), lambda root: (root / "datasets/folder/val").symlink_to("train"))),
        Case("corrupt image", FOLDER, "test_cli.py::test_corrupt_image_in_a_worker_is_one_line_naming_the_file", setup=folder_tree("corrupt image"), hidden=["trainer.epochs=1"]),
        Case("truncated CIFAR batch", ["data=cifar10"], "test_data.py::test_truncated_cifar_batch_is_a_clear_error", setup=then(write("datasets", write_cifar10), truncate("datasets/cifar-10-batches-py/data_batch_3", 0.01))),
        Case("CIFAR batch whose pickle would run code (no file `code_ran` appears)", ["data=cifar10"], "test_reliability.py::test_dataset_file_whose_pickle_would_run_code_is_refused_through_the_cli", setup=then(write("datasets", write_cifar10), write("datasets/cifar-10-batches-py/data_batch_1", lambda path: path.write_bytes(pickle.dumps({"data": RunsCode(open, "code_ran", "w")}))))),
        Case("truncated STL10 binary", ["data=stl10"], "test_data.py::test_truncated_stl10_file_is_a_clear_error", setup=then(write("datasets", write_stl10), truncate("datasets/stl10_binary/train_X.bin", 0.9))),
        Case("labels outside the classes", ["data=stl10"], "test_reliability.py::test_labels_outside_the_classes_are_refused", setup=then(write("datasets", write_stl10), lambda root: (root / "datasets/stl10_binary/train_y.bin").write_bytes(bytes([1, 11] * 10)))),
        Case("dataset smaller than one batch", ["data=cifar10", "data.batch_size=64"], "test_data.py::test_file_dataset_smaller_than_one_batch_names_its_root", setup=write("datasets", write_cifar10)),
        Case("augmentation policy on the device pipeline (which has no seeded batched form of it)", ["data=cifar10", "data.augment=autoaugment", "data.pipeline=device"], "test_transforms.py::test_a_policy_on_the_device_pipeline_is_refused_through_the_cli", setup=write("datasets", write_cifar10), hidden=["data.batch_size=8"]),
        Case("RandAugment magnitude above 30", ["data=cifar10", "data.augment=randaugment", "data.randaugment_m=31"], "test_transforms.py::test_bad_augmentation_settings_are_one_sentence", setup=write("datasets", write_cifar10), hidden=["data.batch_size=8"]),
        Case("RandAugment settings with another recipe (they would do nothing)", ["data=cifar10", "data.randaugment_n=3"], "test_transforms.py::test_bad_augmentation_settings_are_one_sentence", setup=write("datasets", write_cifar10), hidden=["data.batch_size=8"]),
        Case("random erasing probability above 1", ["data=cifar10", "data.random_erasing=1.5"], "test_transforms.py::test_bad_augmentation_settings_are_one_sentence", setup=write("datasets", write_cifar10), hidden=["data.batch_size=8"]),
        Case("zero repeats of repeated augmentation", ["data.repeated_augment=0"], "test_reliability.py::test_loader_values_that_cannot_work_are_refused", hidden=TINY),
    ],
    "Checkpoints": [
        Case("missing file", ["resume=missing.pt"], "test_engine.py::test_user_errors_are_one_clear_sentence"),
        Case("a folder as the checkpoint", ["resume=."], "test_reliability.py::test_a_folder_given_as_the_checkpoint_is_one_sentence", hidden=TINY),
        Case("random bytes", ["resume=random.pt"], "test_engine.py::test_unreadable_checkpoints_are_refused", setup=lambda root: (root / "random.pt").write_bytes(random.Random(0).randbytes(4096))),
        Case("truncated file", ["resume=auto", "hydra.run.dir=run"], "test_cli.py::test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten", setup=then(trained(*TINY), truncate("run/checkpoints/last.pt")), hidden=TINY),
        Case("weights, not a training checkpoint", ["resume=weights.pt"], "test_engine.py::test_truncated_checkpoint_and_foreign_dict_are_refused", setup=lambda root: torch.save({"fc.weight": torch.zeros(10, 64)}, root / "weights.pt")),
        Case("pickle that would run code (it does not run: no file `code_ran` appears)", ["resume=evil.pt"], "test_reliability.py::test_checkpoint_whose_pickle_would_run_code_is_refused_through_the_cli", setup=lambda root: torch.save({"model": RunsCode(open, "code_ran", "w"), "optimizer": {}, "scheduler": {}, "epoch": 1}, root / "evil.pt")),
        Case("... calling a function of `os` (no file `code_ran` appears)", ["resume=evil.pt"], "test_reliability.py::test_checkpoint_whose_pickle_would_run_code_is_refused_through_the_cli", setup=lambda root: torch.save({"model": RunsCode(os.open, "code_ran", os.O_CREAT)}, root / "evil.pt")),
        Case("checkpoint of another model", ["resume=plain/checkpoints/last.pt"], "test_reliability.py::test_resume_from_a_checkpoint_of_another_model_is_refused_unless_forced", setup=trained(*TINY, "model=resnet20", run_dir="plain"), hidden=TINY),
        Case("... and forced anyway", ["resume=plain/checkpoints/last.pt", "resume_force=true"], "test_reliability.py::test_resume_from_a_checkpoint_of_another_model_is_refused_unless_forced", setup=trained(*TINY, "model=resnet20", run_dir="plain"), hidden=TINY),
        Case("unreadable pretrained weights", ["model.pretrained=broken.pt"], "test_pretrained.py::test_cli_trains_from_imported_weights", setup=lambda root: (root / "broken.pt").write_bytes(b"not a torch file")),
        Case("a folder as pretrained weights", ["model.pretrained=."], "test_reliability.py::test_values_that_cannot_work_are_one_sentence_before_training", hidden=TINY),
        Case("released weights of a model that has none", ["model.pretrained=imagenet"], "test_released.py::test_a_model_without_released_weights_lists_those_with_them", hidden=TINY),
        Case("released weights without internet (nothing answers at the mirror)", ["model=resnet18", "model.pretrained=imagenet"], "test_released.py::test_cli_offline_is_one_line_and_leaves_no_run_dir", env={"SETRAIN_WEIGHTS_URL": "http://127.0.0.1:1", "TORCH_HOME": "torch"}, hidden=TINY),
    ],
    "Output": [
        Case("run directory that cannot be made", ["hydra.run.dir=notes.txt/run"], "test_reliability.py::test_run_dir_that_cannot_be_made_is_one_line", setup=lambda root: (root / "notes.txt").write_text("a file")),
        Case("new run in a run directory that holds a run", ["hydra.run.dir=run"], "test_reliability.py::test_a_run_dir_holding_a_run_is_only_continued_with_its_model_and_data", setup=trained(*TINY), hidden=TINY),
        Case("resume in it with another model", ["model=resnet20", "resume=auto", "hydra.run.dir=run"], "test_reliability.py::test_a_run_dir_holding_a_run_is_only_continued_with_its_model_and_data", setup=trained(*TINY), hidden=TINY),
        Case("refused run in the default run dir (`outputs/<date>/<time>_*`)", ["data.batch_size=1000"], "test_reliability.py::test_a_refused_run_leaves_no_run_dir_and_what_was_there_as_it_was", hidden=TINY, left=True),
        Case("refused resume of a run in its run dir", ["resume=auto", "data.batch_size=1000", "hydra.run.dir=run"], "test_reliability.py::test_a_refused_run_leaves_no_run_dir_and_what_was_there_as_it_was", setup=trained(*TINY), hidden=TINY, left=True),
        Case("disk full while writing a checkpoint", ["resume=auto", "trainer.epochs=3", "hydra.run.dir=run"], "test_reliability.py::test_disk_full_while_saving_keeps_the_previous_checkpoint", setup=then(trained(*TINY), lambda root: (root / "run/checkpoints/last.pt.tmp").symlink_to("/dev/full")), hidden=TINY),
        Case("disk full under train.log (a resumed run)", ["resume=auto", "hydra.run.dir=run"], "test_reliability.py::test_a_full_disk_under_train_log_stops_the_resumed_run_in_one_line_and_keeps_last_pt", setup=then(trained(*TINY, "trainer.epochs=1"), log_to_full_disk), hidden=TINY, left=True),
    ],
    "Commands on a trained run": [
        Case("evaluate without a checkpoint", [], "test_trained.py::test_unreadable_checkpoints_are_one_sentence_naming_the_command", program="-m setrain.evaluate"),
        Case("evaluate a file that is not a checkpoint", ["checkpoint=best.pt"], "test_evaluate.py::test_evaluate_cli_reports_a_bad_checkpoint_in_one_line", setup=lambda root: (root / "best.pt").write_bytes(b"\x00garbage"), program="-m setrain.evaluate"),
        Case("predict an image path that does not exist", ["checkpoint=run", "images=nope/"], "test_predict.py::test_predict_cli_prints_a_table_and_reports_a_bad_path_in_one_line", setup=trained(*TINY), program="-m setrain.predict"),
        Case("export to an unknown format", ["checkpoint=run", "format=tflite"], "test_export.py::test_export_cli_refuses_a_bad_checkpoint_or_format_in_one_line", setup=trained(*TINY), program="-m setrain.export"),
        Case("analyze a checkpoint that does not exist", ["checkpoint=nope.pt"], "test_analyze.py::test_analyze_cli_reports_a_missing_checkpoint_in_one_line", program="-m setrain.analyze"),
    ],
    "Runs": [
        Case("second run in a run directory in use", ["resume=auto", "hydra.run.dir=run"], "test_reliability.py::test_a_second_run_in_the_same_dir_is_refused_and_a_killed_run_leaves_no_lock", hidden=TINY),
        Case("SIGTERM while a sweep's first job validates (the sweep stops; the same command continues it)", ["-m", "model.se.reduction=8,16", "hydra.sweep.dir=sweep"], "test_fault_tolerance.py::test_a_signal_no_training_step_sees_stops_the_sweep_after_saving_and_the_sweep_continues", hidden=[*TINY, "data.train_size=128", "data.val_size=512", "trainer.checkpoint_every_n_steps=1"], runner=lambda root, case: signal_while_a_job_validates(root, case)),
        Case("loss that diverges", ["optimizer.lr=1e30"], "test_fault_tolerance.py::test_diverging_run_stops_with_one_sentence_and_writes_no_checkpoint", hidden=TINY),
        Case("sweep report of a single run's directory", ["run"], "test_sweep_report.py::test_a_single_run_dir_is_refused_in_one_line", setup=trained(*TINY), program="scripts/sweep_report.py"),
        Case("a worker of `torchrun --max-restarts` on the agents' shared store (the environment torchrun gives rank 1)", [], "test_scaling.py::test_a_refused_torchrun_worker_leaves_no_run_dir", env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}, hidden=TINY, left=True),
        Case("`HYDRA_FULL_ERROR=1`: the traceback instead of the sentence", ["model.se.reduction=32"], "test_reliability.py::test_hydra_full_error_shows_the_traceback", env={"HYDRA_FULL_ERROR": "1"}),
    ],
}  # fmt: skip


def second_run_while_first_trains(root: Path, case: Case) -> subprocess.CompletedProcess:
    """The case of two runs at once: start a long run, then the case's run in the same dir."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), "trainer.device=cpu", *TINY, "data.train_size=4096",
               "trainer.epochs=50", "hydra.run.dir=run"]  # fmt: skip
    first = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (root / "run" / ".hydra" / "config.yaml").exists():
            assert first.poll() is None
            time.sleep(0.05)
        return cli(root, *case.hidden, *case.args)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def signal_while_a_job_validates(root: Path, case: Case) -> subprocess.CompletedProcess:
    """SIGTERM once the sweep's first job saved its 8th step, the last of epoch 1: it validates.
    The sweep's answer is logged on stdout; it is returned as the stderr the table shows."""
    from setrain.engine.checkpoint import load_checkpoint

    command = [sys.executable, str(REPO_ROOT / "train.py"), *case.args, "trainer.device=cpu", *case.hidden]  # -m first
    sweep = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not any(load_checkpoint(path)["global_step"] >= 8 for path in root.glob("sweep/0_*/checkpoints/last.pt")):
        assert sweep.poll() is None
        time.sleep(0.02)
    sweep.send_signal(signal.SIGTERM)
    stdout, _ = sweep.communicate()
    said = [line.split(" - ", 1)[-1] for line in stdout.splitlines() if "Stopped by" in line or "Run the same" in line]
    return subprocess.CompletedProcess(command, sweep.returncode, stdout, "\n".join(said))


def files(root: Path) -> dict[Path, bytes]:
    return {path.relative_to(root): path.read_bytes() if path.is_file() else b"" for path in root.rglob("*")}


def left_behind(root: Path, before: dict[Path, bytes]) -> str:
    """The files and folders a command added or changed under `root`, in a few words."""
    after = files(root)
    new = sorted(str(path) for path in after if path not in before)
    changed = sorted(str(path) for path in after if path in before and after[path] != before[path])
    said = []
    if new:
        said.append(f"new {', '.join(new[:3])}" + (" ..." if len(new) > 3 else ""))
    if changed:
        said.append(f"changed {', '.join(changed)}")
    return "; ".join(said) or "nothing"


def seen(result: subprocess.CompletedProcess, root: Path) -> str:
    lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        text = "(no error: it trained)"
    elif len(lines) == 1:
        text = lines[0]
    else:
        text = f"a traceback ending in `{lines[-1]}`" if "Traceback" in result.stderr else " ".join(lines)
    text = text.replace(f"{root}/", "").replace(str(root), ".")
    return text if result.returncode in (0, 1) else f"{text} (exit status {result.returncode})"


def table_row(case: Case) -> str:
    """Run the case in a fresh folder: its row of the table."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder).resolve()
        if case.setup:
            case.setup(root)
        before = files(root) if case.left else {}
        if case.test.endswith("a_killed_run_leaves_no_lock"):
            result = second_run_while_first_trains(root, case)
        elif case.runner:
            result = case.runner(root, case)
        else:
            result = cli(root, *case.hidden, *case.args, env=case.env, program=case.program)
        message = seen(result, root)
        if case.left:
            message += f" Added or changed in the folder: {left_behind(root, before)}."
        if "code_ran" in case.what:
            assert not (root / "code_ran").exists()
    env = "".join(f"{key}={value} " for key, value in case.env.items())
    command = f"`{env}python {case.program} {shlex.join(case.args)}`"
    message = message.replace("|", "\\|")
    return f"| {case.what} | {command} | {message} | `{case.test}` |"


def check_tests_exist() -> None:
    for cases in CASES.values():
        for case in cases:
            file, function = case.test.split("::")
            assert f"def {function}(" in (REPO_ROOT / "tests" / file).read_text(), case.test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    check_tests_exist()
    lines = [
        "# Reliability: what a mistake prints",
        "",
        "Every case below was run through its command (`python train.py` with `trainer.device=cpu`, or the",
        "command shown) by",
        "`python scripts/reliability_table.py`, which wrote this file: the message is what it printed",
        "on stderr, with paths relative to the folder it ran in, and it exited with status 1 (another",
        "status would be shown). The test named beside each case holds setrain to that message.",
        "",
    ]
    for section, cases in CASES.items():
        lines += [f"## {section}", "", "| case | command | what the user sees | test |", "|---|---|---|---|"]
        for case in cases:
            lines.append(table_row(case))
            print(lines[-1], flush=True)
        lines.append("")
    lines += [
        "## Killed runs",
        "",
        "Nothing to fix: `resume=auto` continues from the last checkpoint and ends bitwise identical to",
        "a run that was never interrupted; see `test_fault_tolerance.py::test_run_killed_with_sigkill_resumes_to_identical_weights`",
        "(`kill -9` during an epoch), `test_engine.py::test_a_checkpoint_write_cut_short_leaves_last_pt_to_resume_from`",
        "(killed while writing a checkpoint) and",
        "`test_fault_tolerance.py::test_sigterm_saves_and_a_swept_again_multirun_skips_finished_jobs_and_resumes_the_rest`",
        "(SIGTERM saves a checkpoint and exits with 143). A killed run holds no lock: the kernel releases",
        "it with the process.",
        "",
    ]
    if args.no_write:
        return
    DOCS.write_text("\n".join(lines))
    print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
