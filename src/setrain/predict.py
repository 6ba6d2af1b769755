"""Classify image files with a trained model: the top-k classes of each, with probabilities.

    python -m setrain.predict checkpoint=outputs/<run>/checkpoints/best.pt images=photos/ topk=3

Each image gets the validation transform of the checkpoint's data (resize and centre crop,
normalisation) and the labels are named by its dataset's classes, so that dataset is built once.
The table goes to stdout and `predictions.json` into <run dir>/predictions/; `print_json=true`
prints the JSON instead (configs/predict.yaml lists the options).
"""

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from setrain.cli import run, run_command
from setrain.data.folders import load_rgb
from setrain.engine.runtime import resolve_device
from setrain.errors import SetrainError
from setrain.files import write_output
from setrain.trained import load_trained_model, trained_data

IMAGES_FIX = "pass images=<an image file, a folder of images or a list [a.jpg,b.png]>"


def image_files(images) -> list[Path]:
    """The files `images` names: a file, every image under a folder (sorted), or a list of these."""
    files = []
    for entry in map(Path, images if OmegaConf.is_list(images) else [images]):
        if entry.is_dir():
            found = sorted(path for path in entry.rglob("*") if path.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise SetrainError(
                    f"Folder {entry} holds no image files ({', '.join(IMG_EXTENSIONS)}); {IMAGES_FIX}."
                )
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise SetrainError(f"Image path {entry} does not exist; {IMAGES_FIX}.")
    return files


def file_transform(val_transform, size: int) -> v2.Compose:
    """The validation transform, then a resize of the short side and a centre crop to `size`.

    Datasets of one image size (shapes, CIFAR, STL10) validate without resizing; an image file of
    another size still has to reach the model's input size. Resizing after normalising is the
    same linear map up to rounding, and leaves images that already have that size untouched.
    """
    return v2.Compose([val_transform, v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def table(predictions: list[dict], topk: int) -> str:
    width = max(len("image"), *(len(row["image"]) for row in predictions))
    lines = [f"{'image':<{width}}  top-{topk} classes (probability)"]
    for row in predictions:
        top = "  ".join(f"{guess['class']} {100 * guess['probability']:.1f}%" for guess in row["top"])
        lines.append(f"{row['image']:<{width}}  {top}")
    return "\n".join(lines)


def predict(cfg: DictConfig) -> list[dict]:
    """Run the predictions of `cfg` (configs/predict.yaml); returns what predictions.json holds."""
    if OmegaConf.is_missing(cfg, "images"):
        raise SetrainError(f"No images given; {IMAGES_FIX}.")
    if cfg.topk < 1:
        raise SetrainError(f"topk={cfg.topk} must be at least 1, e.g. topk=5.")
    files = image_files(cfg.images)
    trained = load_trained_model(cfg, "predict with")
    device = resolve_device(cfg.device)
    data, data_cfg = trained_data(trained, cfg.get("data"), device)
    transform = file_transform(data.val_transform, data_cfg.get("val_image_size") or data_cfg.image_size)
    names = data.classes or [str(label) for label in range(trained.num_classes)]
    topk = min(cfg.topk, trained.num_classes)
    model = trained.model.to(device).eval()

    predictions = []
    for start in range(0, len(files), data_cfg.batch_size):
        chunk = files[start : start + data_cfg.batch_size]
        images = torch.stack([transform(load_rgb(str(path))) for path in chunk]).to(device)
        with torch.inference_mode():
            top = model(images).softmax(dim=1).topk(topk, dim=1)
        for path, probabilities, labels in zip(chunk, top.values.tolist(), top.indices.tolist()):
            guesses = [
                {"label": label, "class": names[label], "probability": probability}
                for label, probability in zip(labels, probabilities)
            ]
            predictions.append({"image": str(path), "top": guesses})

    if cfg.print_json:
        print(json.dumps(predictions, indent=2))
        return predictions
    print(table(predictions, topk))
    out_dir = trained.output_dir(cfg.output_dir, "predictions")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_output(out_dir / "predictions.json", json.dumps(predictions, indent=2) + "\n")
    print(f"{trained.name} ({trained.weights} weights, epoch {trained.epoch}): {out_dir}/predictions.json")
    return predictions


@hydra.main(version_base="1.3", config_path="../../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_command(predict, cfg)


if __name__ == "__main__":
    sys.exit(run(main))
