"""The real command line, `python train.py ...`, as a user runs it (a few seconds per call)."""

import json

import pytest

from conftest import TINY, assert_user_error, run_cli
from setrain.testing import write_cifar10, write_cifar100, write_image_folder, write_imagenet, write_stl10

pytestmark = pytest.mark.slow


def test_train_then_resume_in_place(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Done: val top-1" in first.stdout
    assert "Curves: tensorboard --logdir run\n" in first.stdout  # relative to the working dir: short to paste
    assert "Evaluate: python -m setrain.evaluate checkpoint=run/checkpoints/best.pt\n" in first.stdout
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "results.json", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    resumed = run_cli(*TINY, "trainer.epochs=3", "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout and "epoch 3/3" in resumed.stdout
    assert "epoch 1/3" not in resumed.stdout
    assert json.loads((run_dir / "results.json").read_text())["final"]["epoch"] == 3


def test_reduction_sweep_runs_every_job_and_reports_the_one_that_cannot_work(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m", *TINY, "trainer.epochs=1", "model.se.reduction=4,32,8", f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )  # fmt: skip
    assert_user_error(result, "r=32 is too large for a layer of 16 channels", "1 job(s) failed")
    finished = sorted(path.parent.name for path in sweep_dir.glob("*/results.json"))
    assert finished == ["0_reduction-4", "2_reduction-8"]  # named after the swept key only
    assert "Sweep sweep: 2 of 3 jobs finished, 1 failed or unfinished." in result.stdout
    assert json.loads((sweep_dir / finished[0] / "results.json").read_text())["params"] > 0


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(*TINY, "model.se.reduction=32", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_user_error(result, "setrain: error: SE reduction ratio r=32 is too large")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    last, results = run_dir / "checkpoints" / "last.pt", run_dir / "results.json"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = {path: path.read_bytes() for path in (last, results, run_dir / "checkpoints" / "best.pt")}

    result = run_cli(*TINY, "trainer.epochs=3", "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_user_error(result, f"Checkpoint {last} cannot be read")
    assert {path: path.read_bytes() for path in before} == before


def write_folder(root):
    write_image_folder(root / "folder" / "train", ["cat", "dog", "fox", "owl"], per_class=6)


@pytest.mark.parametrize(
    "name, write, options, num_classes",
    [
        ("cifar10", write_cifar10, [], 10),
        ("cifar100", write_cifar100, [], 100),
        ("stl10", write_stl10, ["data.image_size=48"], 10),
        ("imagenet", lambda root: write_imagenet(root / "imagenet", devkit=True), ["data.image_size=32"], 3),
        ("folder", write_folder, ["data.image_size=32", "data.val_fraction=0.25"], 4),
    ],
)
def test_every_dataset_trains_from_its_real_format_files(tmp_path, name, write, options, num_classes):
    write(tmp_path / "datasets")
    run_dir = tmp_path / "run"
    result = run_cli(
        f"data={name}", *options, "data.batch_size=8", "data.num_workers=1", "trainer.epochs=1",
        "trainer.device=cpu", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"] == name and results["num_classes"] == num_classes


def test_corrupt_image_in_a_worker_is_one_line_naming_the_file(tmp_path):
    write_folder(tmp_path / "datasets")
    broken = tmp_path / "datasets" / "folder" / "train" / "dog" / "dog_2.png"
    broken.write_bytes(b"not a png")
    result = run_cli(
        "data=folder", "data.image_size=16", "data.val_fraction=0.25", "data.batch_size=4",
        "data.num_workers=2", "trainer.epochs=1", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert_user_error(
        result, f"setrain: error: {broken} is not an image file PIL can read; replace or delete it."
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_imagenet_is_one_line_naming_the_folder(tmp_path):
    result = run_cli("data=imagenet", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_user_error(
        result, f"ImageNet folder {tmp_path / 'datasets' / 'imagenet'} does not exist; set data.root"
    )
