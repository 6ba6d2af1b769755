"""Evaluate a trained model: loss, top-1, top-5 and the confusion matrix on validation data.

    python -m setrain.evaluate checkpoint=outputs/<run>/checkpoints/best.pt data=stl10

writes into <run dir>/evaluation/ (configs/evaluate.yaml lists the options): `evaluation.json`
(the numbers, the top-1 of each class and the confusion matrix) and `confusion_matrix.png`.
The numbers come from the training loop's own `evaluate`; the predictions for the confusion
matrix are read in the same pass by a forward hook.
"""

import json
import logging
import sys

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from setrain.cli import run, run_command
from setrain.engine.loop import evaluate
from setrain.engine.runtime import resolve_device
from setrain.figures import pyplot
from setrain.files import write_output
from setrain.trained import load_trained_model, trained_data

log = logging.getLogger(__name__)

MAX_LABELLED_CLASSES = 30  # more class names on the axes are unreadable
MAX_COUNTED_CLASSES = 20  # up to this many classes, each cell shows its image count


def evaluate_with_predictions(model: nn.Module, loader, device: torch.device) -> tuple[dict, Tensor, Tensor]:
    """loop.evaluate's mean loss, top-1 and top-5 over `loader`, and every image's label and
    top-1 class from the same pass."""
    labels, predictions = [], []

    def labelled(batches):
        for images, targets in batches:
            labels.append(targets)
            yield images, targets

    handle = model.register_forward_hook(
        lambda module, inputs, logits: predictions.append(logits.argmax(dim=1).cpu())
    )
    try:
        metrics = evaluate(model, nn.CrossEntropyLoss(), labelled(loader), device, "evaluate")
    finally:
        handle.remove()
    return metrics, torch.cat(labels), torch.cat(predictions)


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """Images per (true class, predicted class): rows are the labels, columns the predictions."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(
        num_classes, num_classes
    )


def plot_confusion(plt, matrix: np.ndarray, names: list[str], title: str):
    """Each row coloured by its share of the true class, so a class's recall reads on the diagonal
    whatever its size; small matrices also show the counts."""
    num_classes = len(names)
    shares = matrix / matrix.sum(axis=1, keepdims=True).clip(min=1)
    size = min(12.0, 3.0 + 0.4 * num_classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if num_classes <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(num_classes), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(num_classes), names, fontsize=8)
    if num_classes <= MAX_COUNTED_CLASSES:
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if shares[row, column] > 0.5 else "black"
                ax.text(column, row, str(count), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xlabel("predicted class", fontsize=8)
    ax.set_ylabel("true class", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Run the evaluation of `cfg` (configs/evaluate.yaml); returns what evaluation.json holds."""
    plt = pyplot("setrain.evaluate")
    trained = load_trained_model(cfg, "evaluate")
    device = resolve_device(cfg.device)
    data, data_cfg = trained_data(trained, cfg.get("data"), device)
    model = trained.model.to(device)

    out_dir = trained.output_dir(cfg.output_dir, "evaluation")
    log.info(
        "Evaluating %s (epoch %d, %s weights) on %s",
        trained.checkpoint, trained.epoch, trained.weights, data_cfg.name,
    )  # fmt: skip
    metrics, labels, predictions = evaluate_with_predictions(model, data.val_loader, device)
    matrix = confusion_matrix(labels, predictions, trained.num_classes).numpy()
    names = data.classes or [str(label) for label in range(trained.num_classes)]

    results = {
        **trained.provenance,
        "data": data_cfg.name,
        "images": len(labels),
        **metrics,
        "classes": names,
        "class_top1": [  # null for a class without images
            100 * int(hits) / int(count) if count else None
            for hits, count in zip(matrix.diagonal(), matrix.sum(axis=1))
        ],
        "confusion_matrix": matrix.tolist(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_output(out_dir / "evaluation.json", json.dumps(results, indent=2) + "\n")
    title = f"{trained.name} on {data_cfg.name}: top-1 {metrics['top1']:.2f}% ({len(labels)} images)"
    fig = plot_confusion(plt, matrix, names, title)
    write_output(out_dir / "confusion_matrix.png", lambda file: fig.savefig(file, format="png", dpi=72))
    plt.close(fig)
    log.info(
        "val loss %.4f  top-1 %.2f%%  top-5 %.2f%%  on %d images",
        metrics["loss"], metrics["top1"], metrics["top5"], len(labels),
    )  # fmt: skip
    log.info("Done: evaluation.json and confusion_matrix.png in %s", out_dir)
    return results


@hydra.main(version_base="1.3", config_path="../../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_command(evaluate_checkpoint, cfg)


if __name__ == "__main__":
    sys.exit(run(main))
