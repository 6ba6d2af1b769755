"""metrics.csv (a row per epoch, as data) and `setrain.train(overrides=[...])`, the Python entry point."""

import csv
import json
import math
import signal

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import setrain
from conftest import TINY, run_cli
from setrain.engine.metrics_csv import write_epoch_row
from setrain.errors import SetrainError
from test_fault_tolerance import start_cli, wait_for_step

# 2 epochs of 8 steps, a checkpoint after each step: a run to kill inside its second epoch.
KILLED = [*TINY, "data.train_size=128", "trainer.checkpoint_every_n_steps=1"]


def read_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def scalars(tb_dir) -> list[tuple[int, float]]:
    """(step, value) of every scalar under tb/, whatever its tag and run folder."""
    found = []
    for events in {path.parent for path in tb_dir.rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(events)).Reload()
        for tag in accumulator.Tags()["scalars"]:
            found += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return found


def test_train_returns_results_json_and_writes_a_row_per_epoch(tiny_run):
    run_dir, results = tiny_run  # setrain.train([*TINY, "hydra.run.dir=..."])
    assert results == json.loads((run_dir / "results.json").read_text())

    columns, rows = read_rows(run_dir / "metrics.csv")
    assert columns == [
        "epoch", "step", "lr", "train_loss", "train_top1", "train_images_per_s",
        "val_loss", "val_top1", "val_top5", "time",
    ]  # fmt: skip
    assert (run_dir / "metrics.csv").read_text().count("epoch,step") == 1
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert [int(row["step"]) for row in rows] == [4, 8]  # 64 images in batches of 16
    final = rows[-1]
    assert {key: float(final[key]) for key in results["final"]} == results["final"]  # to the last digit
    best = rows[results["best"]["epoch"] - 1]
    assert {key: float(best[key]) for key in results["best"]} == results["best"]

    logged = scalars(run_dir / "tb")
    for row in rows:  # each epoch's val loss is on TensorBoard, at its epoch or its optimizer step
        at = {int(row["epoch"]), int(row["step"])}
        assert any(step in at and math.isclose(value, float(row["val_loss"]), rel_tol=1e-6) for step, value in logged)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epochs=ten", 'trainer.epochs="ten" must be an integer, like its default 2.'),
        ("model=se_resnet51", "model=se_resnet51 is not in configs/model/; choose one of: "),
        ("trainer.epoch=3", "trainer.epoch"),
    ],
)
def test_train_refuses_a_bad_override_with_one_sentence_and_no_run_dir(override, message, tmp_path):
    with pytest.raises(SetrainError) as refused:
        setrain.train([*TINY, override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def epoch_row(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "step": 4 * epoch, "lr": 0.1, "train_loss": loss, "val_top1": 50.0}


def test_an_epoch_replaces_the_rows_from_it_on(tmp_path):
    """As after a resume from an earlier checkpoint, or from one saved before the CSV was."""
    path = tmp_path / "metrics.csv"
    for epoch in (1, 2, 3):
        write_epoch_row(path, epoch_row(epoch, loss=1.0 / epoch))
    write_epoch_row(path, epoch_row(2, loss=0.125))
    columns, rows = read_rows(path)
    assert columns == ["epoch", "step", "lr", "train_loss", "val_top1", "time"]
    assert [(row["epoch"], row["train_loss"]) for row in rows] == [("1", "1.0"), ("2", "0.125")]
    write_epoch_row(path, {**epoch_row(3, loss=0.1), "val_ema_top1": 60.0})  # a column more: added at the end
    columns, rows = read_rows(path)
    assert columns[-1] == "val_ema_top1" and rows[0]["val_ema_top1"] == "" and rows[2]["val_ema_top1"] == "60.0"


def test_a_file_that_is_not_ours_is_one_sentence_and_kept(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("name,score\nme,3\n")
    with pytest.raises(SetrainError, match=r"metrics.csv is not the metrics file setrain writes \(KeyError: 'epoch'\); move it away"):
        write_epoch_row(path, epoch_row(1, loss=1.0))
    assert path.read_text() == "name,score\nme,3\n"


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_the_file_has_each_epoch_once(tmp_path):
    run_dir = tmp_path / "run"
    process = start_cli(*KILLED, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    try:
        wait_for_step(run_dir, "checkpoints/last.pt", 10, process)  # inside epoch 2
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    before = (run_dir / "metrics.csv").read_text()
    assert [row["epoch"] for row in read_rows(run_dir / "metrics.csv")[1]] == ["1"]

    resumed = run_cli(*KILLED, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout
    text = (run_dir / "metrics.csv").read_text()
    assert text.startswith(before)  # epoch 1's row as it was written before the kill
    _, rows = read_rows(run_dir / "metrics.csv")
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "8"), ("2", "16")]
    final = json.loads((run_dir / "results.json").read_text())["final"]
    assert {key: float(rows[-1][key]) for key in final} == final
