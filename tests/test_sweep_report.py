"""scripts/sweep_report.py: a multirun's jobs as a Markdown table and a plot against the swept key."""

import importlib.util
import json
from argparse import Namespace

import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT, TINY, assert_user_error, run_cli, run_program
from setrain.errors import SetrainError

SCRIPT = REPO_ROOT / "scripts" / "sweep_report.py"


@pytest.fixture(scope="module")
def sweep_report():
    spec = importlib.util.spec_from_file_location("sweep_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_job(sweep_dir, number: int, overrides: list[str], top1: float | None = None, params: int = 10**6):
    """A job folder as Hydra and the trainer leave it; without `top1`, one that failed."""
    job = sweep_dir / f"{number}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": number}}}), job / ".hydra" / "hydra.yaml")
    if top1 is not None:
        results = {
            "model": "se_resnet20", "data": "shapes", "params": params, "epochs": 2, "run_time_s": 150.0,
            "final": {"val_top1": top1 - 1}, "best": {"epoch": 2, "val_top1": top1, "val_top5": 99.0},
        }  # fmt: skip
        (job / "results.json").write_text(json.dumps(results))
        (job / "metrics.csv").write_text(f"epoch,step,val_top1\n1,4,{top1 / 2}\n2,8,{top1}\n")


def rows(table: str) -> list[list[str]]:
    """The table's rows below its header, as lists of cells."""
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines]


def test_the_swept_key_is_found_and_orders_the_table_failed_jobs_last(sweep_report, tmp_path):
    jobs = [(16, 80.0, 270_000), (4, 85.5, 290_000), (8, None, 0), (32, 70.0, 260_000)]  # r, top-1, params
    for number, (r, top1, params) in enumerate(jobs):
        write_job(tmp_path, number, [f"model.se.reduction={r}", "trainer.epochs=2"], top1, params)
    sweep_report.report(Namespace(sweep_dir=str(tmp_path), x=None, metric="best.val_top1"))

    table = (tmp_path / "sweep_report.md").read_text()
    assert "4 jobs, 3 finished; all ran with `trainer.epochs=2`." in table
    assert "Highest best.val_top1: 85.50, job 1." in table
    assert [row[:4] for row in rows(table)] == [
        ["1", "model.se.reduction=4", "290,000", "85.50"],  # exact: r barely changes the count
        ["0", "model.se.reduction=16", "270,000", "80.00"],
        ["3", "model.se.reduction=32", "260,000", "70.00"],
        ["2", "model.se.reduction=8", "failed or unfinished (no results.json)", ""],
    ]
    assert rows(table)[0][4:] == ["99.00", "2", "84.50", "2", "2.5 min"]
    for figure in ("sweep_report.png", "sweep_curves.png"):  # slide quality: 160 dpi, over 1000 px wide
        with Image.open(tmp_path / figure) as image:
            assert image.size[0] > 1000 and round(image.info["dpi"][0]) == 160


def test_with_several_swept_keys_the_best_come_first(sweep_report, tmp_path):
    write_job(tmp_path, 0, ["optimizer.lr=0.1", "model.se.reduction=8"], 60.0)
    write_job(tmp_path, 1, ["optimizer.lr=0.01", "model.se.reduction=16"], 75.0)
    sweep_report.report(Namespace(sweep_dir=str(tmp_path), x=None, metric="best.val_top1"))
    table = (tmp_path / "sweep_report.md").read_text()
    assert [row[1] for row in rows(table)] == [
        "model.se.reduction=16 optimizer.lr=0.01",
        "model.se.reduction=8 optimizer.lr=0.1",
    ]
    sweep_report.report(Namespace(sweep_dir=str(tmp_path), x="optimizer.lr", metric="final.val_top1"))
    assert [row[0] for row in rows((tmp_path / "sweep_report.md").read_text())] == ["1", "0"]  # by lr


@pytest.mark.parametrize(
    "x, metric, message",
    [
        ("model.se.gate", "best.val_top1", "--x model.se.gate is not an override of any job in"),
        (None, "best.val_top9", "No results.json in .* has best.val_top9; pass --metric"),
    ],
)
def test_a_key_that_is_not_there_is_refused(sweep_report, tmp_path, x, metric, message):
    write_job(tmp_path, 0, ["model.se.reduction=8"], 60.0)
    with pytest.raises(SetrainError, match=message):
        sweep_report.report(Namespace(sweep_dir=str(tmp_path), x=x, metric=metric))


def test_a_folder_without_jobs_is_refused(sweep_report, tmp_path):
    with pytest.raises(SetrainError, match="does not exist; pass the folder a multirun wrote"):
        sweep_report.report(Namespace(sweep_dir=str(tmp_path / "nope"), x=None, metric="best.val_top1"))
    with pytest.raises(SetrainError, match=r"holds no Hydra jobs \(no <job>/.hydra/ folder\)"):
        sweep_report.report(Namespace(sweep_dir=str(tmp_path), x=None, metric="best.val_top1"))


@pytest.mark.slow
def test_a_single_run_dir_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    write_job(tmp_path, 0, ["trainer.epochs=2"], 60.0)
    (tmp_path / "0_trainer.epochs=2").rename(run_dir)
    (run_dir / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: ???\n")  # a run without -m
    result = run_program(str(SCRIPT), str(run_dir), cwd=tmp_path)
    assert_user_error(result, f"setrain: error: {run_dir} is a single run, not a job of a multirun; pass the folder")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def test_a_job_whose_files_do_not_parse_is_named(sweep_report, tmp_path):
    write_job(tmp_path, 0, ["model.se.reduction=8"], 60.0)
    (tmp_path / "0_model.se.reduction=8" / "results.json").write_text('{"best": ')
    with pytest.raises(SetrainError, match=r"Could not read the job in .*0_model.se.reduction=8 \(JSONDecodeError"):
        sweep_report.report(Namespace(sweep_dir=str(tmp_path), x=None, metric="best.val_top1"))


@pytest.mark.slow
def test_report_of_a_real_reduction_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    trained = run_cli(
        "-m", "model.se.reduction=4,2", *TINY, "trainer.epochs=1", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr
    result = run_program(str(SCRIPT), str(sweep_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = (sweep_dir / "sweep_report.md").read_text()
    assert table in result.stdout
    results = {
        OmegaConf.load(path.parent / ".hydra" / "config.yaml").model.se.reduction: json.loads(path.read_text())
        for path in sweep_dir.glob("*/results.json")
    }
    assert [row[1:4] for row in rows(table)] == [
        [f"model.se.reduction={r}", f"{results[r]['params']:,}", f"{results[r]['best']['val_top1']:.2f}"]
        for r in (2, 4)
    ]
    assert (sweep_dir / "sweep_report.png").stat().st_size > 0
    assert (sweep_dir / "sweep_curves.png").stat().st_size > 0  # from the jobs' metrics.csv

    missing = run_program(str(SCRIPT), str(tmp_path / "nope"), cwd=tmp_path)
    assert_user_error(missing, "setrain: error: Sweep folder")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
