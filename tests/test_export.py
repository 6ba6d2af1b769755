"""`python -m setrain.export`: ONNX and torch.export files that compute what the trained model does."""

import json
import sys

import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from conftest import TINY, assert_user_error, compose_config, run_cli, run_module, write_checkpoint
from setrain.data import build_data
from setrain.data.folders import load_rgb
from setrain.data.shapes import CLASSES
from setrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from setrain.errors import SetrainError
from setrain.export import check_outputs, export_checkpoint, preprocessing
from setrain.models import build_model
from setrain.testing import write_image_folder

CPU = torch.device("cpu")


def export_config(*overrides: str):
    return compose_config(*overrides, config_name="export")


def trained_outputs(state: dict, weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's validation images and the logits of its model as trained (fused where it was), in batches."""
    model = build_model(state["config"]["model"], 10).eval()
    model.load_state_dict(state[weights])
    data = build_data(state["config"]["data"], CPU)
    images = torch.cat([batch for batch, _ in data.val_loader])
    with torch.inference_mode():
        return images, model(images)


def assert_exports_compute_the_model(out_dir, images: torch.Tensor, expected: torch.Tensor, formats) -> None:
    """Each file, loaded as a deployer would, gives the model's logits on every validation image,
    in one batch of all of them and image by image (the batch dimension is free)."""
    tolerance = dict(rtol=1e-4, atol=1e-4)
    if "onnx" in formats:
        session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        (outputs,) = session.run(None, {"image": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(outputs), expected, **tolerance)
        (single,) = session.run(None, {"image": images[:1].numpy()})
        torch.testing.assert_close(torch.from_numpy(single), expected[:1], **tolerance)
    if "pt2" in formats:
        program = torch.export.load(out_dir / "model.pt2")
        calls = [node.target for node in program.graph.nodes if node.op == "call_function"]
        assert all(str(target).startswith("aten.") for target in calls), set(map(str, calls))  # plain ops
        with torch.inference_mode():
            torch.testing.assert_close(program.module()(images), expected, **tolerance)
            torch.testing.assert_close(program.module()(images[:1]), expected[:1], **tolerance)


def onnx_top1(model_file, data) -> float:
    """The top-1 of an ONNX file in onnxruntime on every validation image of `data`."""
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    hits = sum(
        int((session.run(None, {"image": images.numpy()})[0].argmax(axis=1) == labels.numpy()).sum())
        for images, labels in data.val_loader
    )
    return 100 * hits / len(data.val_loader.dataset)


@pytest.mark.slow
def test_a_fused_compiled_run_exports_its_ema_weights_as_plain_ops(tmp_path):
    torch.manual_seed(1)
    ema = build_model(compose_config(*TINY).model, 10).state_dict()
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    state = write_checkpoint(checkpoint, "model.se.fused=true", "trainer.compile=true", ema=ema)
    description = export_checkpoint(export_config(f"checkpoint={checkpoint}"))

    out_dir = tmp_path / "run" / "export"
    assert sorted(path.name for path in out_dir.iterdir()) == ["model.json", "model.onnx", "model.pt2"]
    assert json.loads((out_dir / "model.json").read_text()) == description
    assert (description["weights"], description["model"], description["epoch"]) == ("ema", "se_resnet20", 1)
    assert description["classes"] == list(CLASSES)
    assert description["input"] == {"name": "image", "shape": ["batch", 3, 16, 16]}
    assert description["output"] == {"name": "logits", "shape": ["batch", 10]}
    recipe = description["preprocessing"]
    assert (recipe["resize"], recipe["center_crop"], recipe["mean"], recipe["std"]) == (16, 16, [0.5] * 3, [0.5] * 3)
    images, expected = trained_outputs(state, "ema")
    assert len(images) == 32  # TINY's validation set
    assert_exports_compute_the_model(out_dir, images, expected, ("onnx", "pt2"))


def test_model_json_holds_what_turns_an_image_file_into_the_validation_input(tmp_path):
    """A deployer following model.json (torchvision's functional ops here) gets the tensor the
    validation transform makes, for photos of varied sizes resized and cropped like ImageNet."""
    photos = write_image_folder(tmp_path / "val", ["cat", "dog"], per_class=3)
    write_image_folder(tmp_path / "train", ["cat", "dog"], per_class=1)
    cfg = compose_config("data=folder", f"data.root={tmp_path}", "data.image_size=24", "data.num_workers=0", "data.batch_size=2")
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), CPU)
    recipe = preprocessing(data.val_transform, 24)
    assert (recipe["resize"], recipe["center_crop"]) == (round(24 / 0.875), 24)
    assert (recipe["mean"], recipe["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    mean, std = torch.tensor(recipe["mean"])[:, None, None], torch.tensor(recipe["std"])[:, None, None]
    for path in sorted(photos.rglob("*.*")):
        image = F.pil_to_tensor(load_rgb(str(path)))
        image = F.resize(image, [recipe["resize"]], InterpolationMode(recipe["interpolation"]), antialias=recipe["antialias"])
        image = F.center_crop(image, [recipe["center_crop"]])
        deployed = (image.float() * recipe["scale"] - mean) / std
        torch.testing.assert_close(deployed, data.val_transform(load_rgb(str(path))), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_se_mobilenet_exports_to_onnx(tmp_path):
    """The other model family, through the ONNX path alone; others: test_each_kind_of_model_exports."""
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    state = write_checkpoint(checkpoint, "model=se_mobilenet_v1", "model.width_mult=0.25")
    export_checkpoint(export_config(f"checkpoint={checkpoint}", "format=onnx"))
    assert sorted(path.name for path in (tmp_path / "run" / "export").iterdir()) == ["model.json", "model.onnx"]
    assert_exports_compute_the_model(tmp_path / "run" / "export", *trained_outputs(state, "model"), ("onnx",))


def test_a_file_whose_outputs_differ_beyond_float_rounding_is_refused():
    expected = torch.tensor([[10.0, -3.0, 0.5]])
    assert check_outputs("ONNX", expected + 1e-4, expected) == pytest.approx(1e-4, rel=1e-2)
    with pytest.raises(SetrainError, match=r"ONNX file's outputs differ from the PyTorch model's by 0.1 "):
        check_outputs("ONNX", expected - torch.tensor([[0.0, 0.0, 0.1]]), expected)


def without_the_export_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` raises ImportError


def test_without_the_export_extra_onnx_is_refused_in_one_sentence(tmp_path, monkeypatch):
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    write_checkpoint(checkpoint)
    without_the_export_extra(monkeypatch)
    with pytest.raises(SetrainError, match=r"needs the onnxscript package.*pip install 'setrain\[export\]'"):
        export_checkpoint(export_config(f"checkpoint={checkpoint}", "format=both"))
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.slow
def test_without_the_export_extra_pt2_still_exports(tmp_path, monkeypatch):
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    state = write_checkpoint(checkpoint, "model=resnet20")
    without_the_export_extra(monkeypatch)
    export_checkpoint(export_config(f"checkpoint={checkpoint}", "format=pt2", f"output_dir={tmp_path / 'out'}"))
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model.json", "model.pt2"]
    assert_exports_compute_the_model(tmp_path / "out", *trained_outputs(state, "model"), ("pt2",))


@pytest.mark.slow
def test_export_cli_gives_the_runs_validation_accuracy_in_onnxruntime(trained_run, tmp_path):
    result = run_module("setrain.export", f"checkpoint={trained_run / 'checkpoints' / 'last.pt'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing lands in the working directory
    out_dir = trained_run / "export"
    assert "model.onnx, model.pt2, model.json" in result.stdout
    description = json.loads((out_dir / "model.json").read_text())
    data = build_data(torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)["config"]["data"], CPU)
    final = json.loads((trained_run / "results.json").read_text())["final"]
    assert onnx_top1(out_dir / "model.onnx", data) == pytest.approx(final["val_top1"])
    assert description["weights"] == "model" and description["classes"] == list(CLASSES)


@pytest.mark.slow
def test_a_run_trained_fused_compiled_with_ema_exports_its_ema_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    options = ["model.se.fused=true", "trainer.compile=aot_eager", "trainer.ema_decay=0.9"]
    trained = run_cli(*TINY, *options, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    checkpoint = run_dir / "checkpoints" / "last.pt"
    description = export_checkpoint(export_config(f"checkpoint={checkpoint}", "format=onnx"))
    assert description["weights"] == "ema"
    data = build_data(torch.load(checkpoint, weights_only=True)["config"]["data"], CPU)
    final = json.loads((run_dir / "results.json").read_text())["final"]
    assert onnx_top1(run_dir / "export" / "model.onnx", data) == pytest.approx(final["val_ema_top1"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint=nope.pt"], "Checkpoint nope.pt does not exist; pass checkpoint=<run dir>/checkpoints/best.pt"),
        (["checkpoint=x.pt", "format=tflite"], "format=tflite is not known; choose one of: onnx, pt2, both."),
    ],
)
def test_export_cli_refuses_a_bad_checkpoint_or_format_in_one_line(tmp_path, overrides, message):
    result = run_module("setrain.export", *overrides, cwd=tmp_path)
    assert_user_error(result, f"setrain: error: {message}")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


# One model per kind of ResNet block and stem: CIFAR basic, ImageNet basic, grouped bottleneck
# (MobileNet: test_se_mobilenet_exports_to_onnx). Every model of the zoo passed once, on
# 2026-11-28, in 40 minutes of this test on 2 cores: too long to repeat on every run.
EXPORTED_KINDS = ["se_resnet20", "se_resnet18", "se_resnext50_32x4d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTED_KINDS)
def test_each_kind_of_model_exports(tmp_path, name):
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    state = write_checkpoint(checkpoint, f"model={name}", "data.val_size=4", "data.batch_size=4")
    export_checkpoint(export_config(f"checkpoint={checkpoint}"))
    assert_exports_compute_the_model(tmp_path / "run" / "export", *trained_outputs(state, "model"), ("onnx", "pt2"))
