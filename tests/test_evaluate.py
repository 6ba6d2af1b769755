"""`python -m setrain.evaluate`: loss, top-1, top-5 and the confusion matrix of a trained model."""

import json

import pytest
import torch
from torch import nn

from conftest import TINY, assert_user_error, compose_config, run_cli, run_module, write_checkpoint
from setrain.engine.loop import evaluate
from setrain.evaluate import confusion_matrix, evaluate_checkpoint
from setrain.models import create_model
from setrain.trained import load_trained_model, trained_data


def evaluate_config(*overrides: str):
    return compose_config("device=cpu", *overrides, config_name="evaluate")


def test_confusion_matrix_counts_label_prediction_pairs():
    labels, predictions = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_matrix(labels, predictions, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


# weights=model (and ema) are chosen by the code every command shares: test_trained.py, fast.
@pytest.mark.parametrize("weights", ["auto", pytest.param("model", marks=pytest.mark.slow)])
def test_evaluation_matches_the_training_loops_numbers_for_the_weights_chosen(tmp_path, weights):
    torch.manual_seed(1)
    ema = create_model("se_resnet20", num_classes=10).state_dict()
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    state = write_checkpoint(checkpoint, ema=ema)
    cfg = evaluate_config(f"checkpoint={checkpoint}", f"weights={weights}")
    results = evaluate_checkpoint(cfg)

    # The same numbers as the training loop's evaluate on the same data and weights.
    trained = load_trained_model(cfg, "evaluate")
    trained.model.load_state_dict(ema if weights == "auto" else state["model"])
    data, _ = trained_data(trained, None, torch.device("cpu"))
    expected = evaluate(trained.model, nn.CrossEntropyLoss(), data.val_loader, torch.device("cpu"))
    assert results["weights"] == ("ema" if weights == "auto" else "model")
    assert {key: results[key] for key in expected} == pytest.approx(expected)

    matrix = torch.tensor(results["confusion_matrix"])
    assert matrix.sum() == results["images"] == 32
    assert 100 * matrix.trace().item() / 32 == pytest.approx(results["top1"])
    labels = torch.cat([targets for _, targets in data.val_loader])
    assert matrix.sum(dim=1).tolist() == torch.bincount(labels, minlength=10).tolist()
    assert results["classes"][:3] == ["disk", "ring", "square"]
    assert [round(x, 6) if x is not None else None for x in results["class_top1"]] == [
        round(100 * hits / count, 6) if count else None
        for hits, count in zip(matrix.diagonal().tolist(), matrix.sum(dim=1).tolist())
    ]

    out = tmp_path / "run" / "evaluation"
    assert json.loads((out / "evaluation.json").read_text()) == results
    assert (out / "confusion_matrix.png").stat().st_size > 0


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_runs_final_validation(trained_run, tmp_path):
    result = run_module("setrain.evaluate", f"checkpoint={trained_run / 'checkpoints' / 'last.pt'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing lands in the working directory
    report = json.loads((trained_run / "evaluation" / "evaluation.json").read_text())
    final = json.loads((trained_run / "results.json").read_text())["final"]
    assert (report["weights"], report["epoch"], report["images"]) == ("model", 2, 32)
    for key in ("loss", "top1", "top5"):
        assert report[key] == pytest.approx(final[f"val_{key}"])
    assert f"top-1 {report['top1']:.2f}%" in result.stdout
    assert (trained_run / "evaluation" / "confusion_matrix.png").stat().st_size > 0


@pytest.mark.slow
def test_a_run_with_ema_is_evaluated_with_its_ema_weights_unless_told_otherwise(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_cli(*TINY, "trainer.ema_decay=0.9", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    final = json.loads((run_dir / "results.json").read_text())["final"]
    for weights, prefix in (("auto", "val_ema_"), ("model", "val_")):
        cfg = evaluate_config(f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"weights={weights}")
        results = evaluate_checkpoint(cfg)
        assert {key: results[key] for key in ("loss", "top1", "top5")} == pytest.approx(
            {key: final[prefix + key] for key in ("loss", "top1", "top5")}
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist; pass checkpoint=<run dir>/checkpoints/best.pt"),
        (b"\x00garbage", "it is truncated, corrupt or not a PyTorch file; evaluate another one"),
    ],
)
def test_evaluate_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, content, message):
    checkpoint = tmp_path / "best.pt"
    if content is not None:
        checkpoint.write_bytes(content)
    result = run_module("setrain.evaluate", f"checkpoint={checkpoint}", cwd=tmp_path)
    assert_user_error(result, "setrain: error: Checkpoint", message)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_an_output_that_cannot_be_written_is_one_sentence_and_leaves_no_part(trained_run, tmp_path):
    out = tmp_path / "out"
    (out / "evaluation.json").mkdir(parents=True)  # a folder where the file goes: the write fails
    checkpoint = trained_run / "checkpoints" / "last.pt"
    result = run_module("setrain.evaluate", f"checkpoint={checkpoint}", f"output_dir={out}", cwd=tmp_path)
    assert_user_error(result, f"Could not write {out / 'evaluation.json'}", "then run the command again")
    assert sorted(path.name for path in out.iterdir()) == ["evaluation.json"]
