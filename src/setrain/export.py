"""Export a trained model for deployment: an ONNX file, a torch.export program, and what feeds them.

    python -m setrain.export checkpoint=outputs/<run>/checkpoints/best.pt format=both

writes into <run dir>/export/ (configs/export.yaml lists the options): `model.onnx`
(torch.onnx.export, for onnxruntime and the runtimes that read ONNX) and/or `model.pt2`
(torch.export.save, for torch.export.load and AOTInductor), both taking a float32 batch
[batch, 3, size, size] of any batch size and returning logits; and `model.json`: the class names,
the input size and the preprocessing, read from the run's own validation transform. The weights are
those `weights` chooses (the EMA ones where the run kept them), on the unfused forward, so a
model trained with model.se.fused or trainer.compile exports as plain torch ops. Each file is
checked on the first validation batch against the PyTorch model before it is written.
"""

import io
import json
import logging
import sys

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.transforms import v2

from setrain.cli import run, run_command
from setrain.errors import SetrainError
from setrain.files import write_output
from setrain.models.fused_se import unfuse
from setrain.trained import load_trained_model, trained_data

log = logging.getLogger(__name__)

FORMATS = {"onnx": ["onnx"], "pt2": ["pt2"], "both": ["onnx", "pt2"]}
CHECKED_IMAGES = 16  # of the first validation batch: enough to catch a wrong graph, quick to run
TOLERANCE = 1e-3  # of the largest logit: float32 kernels differ by far less, a wrong op by far more


def onnxruntime_module():
    """onnxruntime, once the `export` extra's packages are known to be there (torch.onnx.export
    needs onnx and onnxscript)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
        import onnxruntime
    except ImportError as error:
        raise SetrainError(
            f"format=onnx needs the {error.name} package, which is not installed; run "
            "pip install 'setrain[export]', or export format=pt2 only."
        ) from error
    return onnxruntime


def preprocessing(val_transform: v2.Compose, input_size: int) -> dict:
    """What a deployer does to a decoded RGB image, read from the validation transform itself so it
    cannot drift from what the model was validated on. Datasets of one image size validate without
    resizing; another image is resized to the input size first, as setrain.predict does."""
    steps = val_transform.transforms
    resize = next((step for step in steps if isinstance(step, v2.Resize)), None)
    normalize = next(step for step in steps if isinstance(step, v2.Normalize))
    return {
        "color": "RGB",
        "resize": resize.size[0] if resize else input_size,
        "resize_applies_to": "shorter side",
        "interpolation": v2.InterpolationMode(resize.interpolation if resize else "bilinear").value,
        "antialias": resize.antialias if resize else True,
        "center_crop": input_size,
        "scale": 1 / 255,
        "mean": list(normalize.mean),
        "std": list(normalize.std),
        "layout": "NCHW",
        "dtype": "float32",
    }


def check_outputs(what: str, outputs: Tensor, expected: Tensor) -> float:
    """The largest difference between an exported file's outputs and the PyTorch model's; a
    difference beyond TOLERANCE means the file computes something else, so it is not written."""
    difference = (outputs - expected).abs().max().item()
    if difference > TOLERANCE * max(1.0, expected.abs().max().item()):
        raise SetrainError(
            f"The exported {what} file's outputs differ from the PyTorch model's by {difference:.3g} on "
            "the first validation batch, so it is not written; export the other format and report "
            "this model."
        )
    return difference


def export_pt2(program: torch.export.ExportedProgram, images: Tensor, expected: Tensor) -> tuple[bytes, float]:
    """torch.export.save's bytes, checked by loading them back as a deployer would."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    loaded = torch.export.load(io.BytesIO(buffer.getvalue()))
    with torch.inference_mode():
        outputs = loaded.module()(images)
    return buffer.getvalue(), check_outputs("pt2", outputs, expected)


def export_onnx(program: torch.export.ExportedProgram, images: Tensor, expected: Tensor) -> tuple[bytes, float]:
    """torch.onnx.export's bytes of the same program, checked in onnxruntime."""
    onnxruntime = onnxruntime_module()
    for name in ("onnxscript", "onnx_ir"):  # their graph optimizer logs every rewrite at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    onnx_program = torch.onnx.export(
        program, input_names=["image"], output_names=["logits"], dynamo=True, verbose=False
    )
    serialized = onnx_program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    (outputs,) = session.run(None, {"image": images.numpy()})
    return serialized, check_outputs("ONNX", torch.from_numpy(outputs), expected)


def exported_program(model: nn.Module, images: Tensor) -> torch.export.ExportedProgram:
    """The model's graph for any batch size (both formats are made from it)."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (images,), dynamic_shapes=({0: batch},))


def export_checkpoint(cfg: DictConfig) -> dict:
    """Run the export of `cfg` (configs/export.yaml); returns what model.json holds."""
    if cfg.format not in FORMATS:
        raise SetrainError(f"format={cfg.format} is not known; choose one of: {', '.join(FORMATS)}.")
    formats = FORMATS[cfg.format]
    if "onnx" in formats:
        onnxruntime_module()  # refused before the checkpoint and data are read
    trained = load_trained_model(cfg, "export")
    data, data_cfg = trained_data(trained, cfg.get("data"), torch.device("cpu"))
    model = unfuse(trained.model).eval()
    images = next(iter(data.val_loader))[0][:CHECKED_IMAGES]
    if len(images) == 1:  # torch.export would fix a batch dimension of size 1
        images = images.repeat(2, 1, 1, 1)
    with torch.inference_mode():
        expected = model(images)
    log.info(
        "Exporting %s (epoch %d, %s weights) as %s",
        trained.checkpoint, trained.epoch, trained.weights, " and ".join(formats),
    )  # fmt: skip
    program = exported_program(model, images)
    exporters = {"onnx": export_onnx, "pt2": export_pt2}
    files, differences = {}, {}
    for name in formats:
        files[f"model.{name}"], differences[name] = exporters[name](program, images, expected)

    input_size = images.shape[-1]
    description = {
        **trained.provenance,
        "files": list(files) + ["model.json"],
        "input": {"name": "image", "shape": ["batch", images.shape[1], input_size, input_size]},
        "output": {"name": "logits", "shape": ["batch", trained.num_classes]},
        "classes": data.classes or [str(label) for label in range(trained.num_classes)],
        "preprocessing": preprocessing(data.val_transform, input_size),
        "checked_on": f"{len(images)} images of the {data_cfg.name} validation set",
        "max_abs_difference": differences,
    }
    out_dir = trained.output_dir(cfg.output_dir, "export")
    for filename, content in files.items():
        write_output(out_dir / filename, lambda file, content=content: file.write(content))
    write_output(out_dir / "model.json", json.dumps(description, indent=2) + "\n")
    checks = ", ".join(f"{name} {difference:.2g}" for name, difference in differences.items())
    log.info("Largest difference to the PyTorch model's logits on %s: %s", description["checked_on"], checks)
    log.info("Done: %s in %s", ", ".join(description["files"]), out_dir)
    return description


@hydra.main(version_base="1.3", config_path="../../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    run_command(export_checkpoint, cfg)


if __name__ == "__main__":
    sys.exit(run(main))
