"""`python -m setrain.predict`: the top-k classes of image files, as validation would see them."""

import json

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from conftest import assert_user_error, compose_config, run_module, write_checkpoint
from setrain.data.shapes import CLASSES, ShapesDataset
from setrain.errors import SetrainError
from setrain.models import build_model
from setrain.predict import file_transform, image_files, predict


def predict_config(*overrides: str):
    return compose_config("device=cpu", *overrides, config_name="predict")


@pytest.fixture
def run_with_images(tmp_path):
    """A checkpoint of TINY's model, and five of its validation images as PNG files in nested folders."""
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    write_checkpoint(checkpoint)
    val = ShapesDataset(32, 16, seed=1)  # TINY's validation set: data.seed 0 -> stream 2 * 0 + 1
    for index in range(5):
        path = tmp_path / "images" / ("b" if index > 2 else "a") / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        F.to_pil_image(val.images[index]).save(path)
    return checkpoint, tmp_path / "images", val


def test_predictions_are_the_models_probabilities_on_the_validation_tensors(run_with_images, capsys):
    checkpoint, images, val = run_with_images
    predictions = predict(predict_config(f"checkpoint={checkpoint}", f"images={images}", "topk=3"))

    state = torch.load(checkpoint, weights_only=True)
    model = build_model(state["config"]["model"], 10).eval()
    model.load_state_dict(state["model"])
    with torch.no_grad():
        expected = model(torch.stack([val[index][0] for index in range(5)])).softmax(dim=1)
    assert [row["image"] for row in predictions] == [str(images / "a" / f"{i}.png") for i in range(3)] + [
        str(images / "b" / f"{i}.png") for i in (3, 4)
    ]
    for row, probabilities in zip(predictions, expected):
        top = probabilities.topk(3)
        assert [guess["label"] for guess in row["top"]] == top.indices.tolist()
        assert [guess["class"] for guess in row["top"]] == [CLASSES[i] for i in top.indices]
        assert [guess["probability"] for guess in row["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)

    written = json.loads((checkpoint.parent.parent / "predictions" / "predictions.json").read_text())
    assert written == predictions
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "top-3", "classes", "(probability)"]
    first = predictions[0]["top"][0]
    assert table[1].split()[:3] == [predictions[0]["image"], first["class"], f"{100 * first['probability']:.1f}%"]


def test_json_goes_to_stdout_and_topk_stops_at_the_number_of_classes(run_with_images, capsys):
    checkpoint, images, _ = run_with_images
    image = images / "a" / "0.png"
    cfg = predict_config(f"checkpoint={checkpoint}", f"images=[{image}]", "topk=50", "print_json=true")
    predictions = predict(cfg)
    assert json.loads(capsys.readouterr().out) == predictions
    assert len(predictions) == 1 and len(predictions[0]["top"]) == 10
    assert sum(guess["probability"] for guess in predictions[0]["top"]) == pytest.approx(1)
    assert not (checkpoint.parent.parent / "predictions").exists()


def test_images_of_another_size_reach_the_models_input_size():
    transform = file_transform(ShapesDataset.transform, 16)
    assert transform(Image.new("RGB", (40, 24))).shape == (3, 16, 16)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(transform(F.to_pil_image(image)), ShapesDataset.transform(F.to_pil_image(image)))


def test_image_paths_and_their_errors(run_with_images, tmp_path):
    _, images, _ = run_with_images
    assert image_files(str(images / "b")) == [images / "b" / "3.png", images / "b" / "4.png"]
    with pytest.raises(SetrainError, match=r"Image path .*nope.png does not exist; pass images=<an image file"):
        image_files(str(tmp_path / "nope.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetrainError, match=r"Folder .*empty holds no image files \(.jpg"):
        image_files(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["images=IMAGES", "topk=0"], r"topk=0 must be at least 1"),
        ([], r"No images given; pass images="),
        (["images=BROKEN"], r"broken.png is not an image file PIL can read"),
    ],
)
def test_user_errors(run_with_images, tmp_path, overrides, message):
    checkpoint, images, _ = run_with_images
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    overrides = [override.replace("BROKEN", str(broken)).replace("IMAGES", str(images)) for override in overrides]
    with pytest.raises(SetrainError, match=message):
        predict(predict_config(f"checkpoint={checkpoint}", *overrides))


@pytest.mark.slow
def test_predict_cli_prints_a_table_and_reports_a_bad_path_in_one_line(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "best.pt"
    image = tmp_path / "shape.png"
    F.to_pil_image(ShapesDataset(1, 16, seed=5).images[0]).save(image)
    result = run_module("setrain.predict", f"checkpoint={checkpoint}", f"images={image}", "topk=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["image", "top-2"] and lines[1].startswith(str(image))
    assert sum(word in CLASSES for word in lines[1].split()) == 2
    assert (trained_run / "predictions" / "predictions.json").is_file()

    missing = run_module("setrain.predict", f"checkpoint={checkpoint}", "images=nope/", cwd=tmp_path)
    assert_user_error(missing, "setrain: error: Image path nope does not exist; pass images=")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
