"""Weight import from a local file: torchvision, timm and Cadene (pretrained-models) ResNet state dicts.

`model.pretrained=<path>` names a file saved with ``torch.save`` (`imagenet` downloads the model's
released file first, setrain.models.released). Our ResNets carry torchvision's layer names, so only
SE layers (`se.fc1` -> `se.excitation.0`) and Cadene's stem and classifier are renamed; the
1x1-conv excitation kernels of timm and Cadene become our SE Linear weights, and everything is
checked before anything is loaded.
Two holes are allowed and logged: SE layers absent from a plain network's file (torchvision
ResNets into SE-ResNets) and a classifier for another number of classes (fine-tuning) keep their
fresh initialisation.
"""

import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from setrain.errors import SetrainError
from setrain.files import load_torch_file
from setrain.models.resnet import renamed_from_sequential_layout

log = logging.getLogger(__name__)

FORMATS = ("auto", "torchvision", "timm", "cadene", "setrain")
# The key layouts each format's files have: timm's ResNets use torchvision's names (plus
# `se.fc1/fc2`), and so do setrain's, whose SE layers alone are named otherwise.
_LAYOUTS = {
    "torchvision": ("torchvision",), "timm": ("torchvision",), "cadene": ("cadene",),
    "setrain": ("setrain", "torchvision"),
}
_LAYOUT_NAMES = {"torchvision": "torchvision/timm", "cadene": "Cadene/timm legacy_*", "setrain": "setrain"}

# Cadene's SE-ResNet-50/101/152 (its SEResNetBottleneck) stride the first 1x1 conv, as the Caffe
# models did; its SE-ResNeXts and SENet-154 stride the 3x3, as we do.
_STRIDE_IN_FIRST_CONV = ("se_resnet50", "se_resnet101", "se_resnet152")
# timm's legacy_seresnet18/34 (trained in timm; Cadene has no such models) apply a ReLU after the
# second BN, before SE.
_RELU_BEFORE_SE = ("se_resnet18", "se_resnet34")


def read_state_dict(path: Path | str) -> dict[str, Tensor]:
    """The tensors of a weights file: a bare state dict or one under "state_dict" or "model"
    (timm's and setrain's checkpoints), read as data only and without a DDP "module." prefix."""
    path = Path(path)
    content = load_torch_file(
        path,
        f"The pretrained weights file {path}",
        missing_fix="set model.pretrained to a local .pt/.pth file, or to imagenet for released weights",
        unreadable_fix="download or save the weights again",
    )
    for wrapper in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    if not isinstance(content, dict) or not content or not all(
        isinstance(value, Tensor) for value in content.values()
    ):
        raise SetrainError(
            f"Pretrained weights {path} are not a state dict (a dict of tensors, bare or under "
            "'state_dict' or 'model'); save one with torch.save(model.state_dict(), path)."
        )
    if all(key.startswith("module.") for key in content):
        content = {key.removeprefix("module."): value for key, value in content.items()}
    return content


def detect_layout(state_dict: dict[str, Tensor]) -> str:
    """"cadene", "torchvision" (also timm's) or "setrain", from the key names alone."""
    keys = list(state_dict)
    if any(key.startswith(("layer0.", "last_linear.")) or ".se_module." in key for key in keys):
        return "cadene"
    if any(key.startswith(("stem.", "stages.")) or ".se.excitation." in key for key in keys):
        return "setrain"
    if any(key.startswith("layer1.") for key in keys):
        return "torchvision"
    raise SetrainError(
        f"The weights' keys ({', '.join(keys[:3])}, ...) are not those of a torchvision, timm, "
        "Cadene or setrain ResNet; pass a state dict of one of those models."
    )


# Our ResNets carry torchvision's names (timm's too); only the SE layers and Cadene's stem and
# classifier are named otherwise.
_RENAMES = [
    (r"^(layer\d+\.\d+)\.se(_module)?\.fc1\.", r"\1.se.excitation.0."),
    (r"^(layer\d+\.\d+)\.se(_module)?\.fc2\.", r"\1.se.excitation.2."),
    (r"^last_linear\.", "fc."),
]


def _our_key(key: str, deep_stem: bool) -> str:
    """Our name for a torchvision/timm/Cadene key; a key it does not know is kept as it is."""
    if match := re.match(r"^layer0\.(conv|bn)(\d)\.(.*)$", key):  # Cadene's stem
        layer, number, rest = match[1], int(match[2]), match[3]
        if not deep_stem:
            return f"{layer}1.{rest}"
        if (layer, number) == ("bn", 3):
            return f"bn1.{rest}"
        return f"conv1.{3 * (number - 1) + (layer == 'bn')}.{rest}"  # timm's deep-stem Sequential
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_state_dict(state_dict: dict[str, Tensor], layout: str) -> dict[str, tuple[str, Tensor]]:
    """Our key -> (the file's key, tensor in our shape) for a state dict in `layout`."""
    if layout == "setrain":
        state_dict = renamed_from_sequential_layout(state_dict)
        return {key: (key, value) for key, value in state_dict.items()}
    deep_stem = "layer0.conv2.weight" in state_dict
    converted = {}
    for key, value in state_dict.items():
        ours = _our_key(key, deep_stem)
        if ".se.excitation." in ours and value.dim() == 4:  # 1x1 conv kernel -> Linear weight
            value = value.flatten(1)
        converted[ours] = (key, value)
    return converted


def _relu_before(module: nn.Module, inputs: tuple[Tensor]) -> tuple[Tensor]:
    return (torch.relu(inputs[0]),)


def adapt_to_cadene_layout(model: nn.Module, model_name: str) -> list[str]:
    """Make `model` compute what Cadene's SENets (timm's legacy_*) compute with the same weights.

    Their parameters have our shapes, but choices of the original Caffe models change the
    outputs, so weights trained with them need them: the stem's 3x3/2 max pool rounds up
    (ceil_mode) instead of padding by 1, and SE-ResNet-50/101/152 put a block's stride on its first
    1x1 conv instead of the 3x3; timm's SE-ResNet-18/34 ports add a ReLU before SE (a hook on
    each SE block, whose input it is; those blocks then run unfused). No key or shape
    changes: a run resumed with the same config imports the file again and so gets the same
    layout, but a checkpoint of it used as `model.pretrained` does not. Returns what was changed,
    for the log.
    """
    changes = []
    blocks = [block for stage in model.stages() for block in stage]
    if isinstance(model.maxpool, nn.MaxPool2d):
        model.maxpool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        changes.append("stem max pool with ceil_mode and no padding")
    if model_name in _STRIDE_IN_FIRST_CONV:
        for block in blocks:
            block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride
        changes.append("stride on the first 1x1 conv of each downsampling block")
    if model_name in _RELU_BEFORE_SE:
        for block in blocks:
            block.se.register_forward_pre_hook(_relu_before)
            block.fused = False
        changes.append("a ReLU before SE in each block")
    return changes


def _kept_at_init(converted: dict, expected: dict) -> tuple[set[str], list[str]]:
    """The keys of our model that may stay at their init, and why, for the log."""
    keys, reasons = set(), []
    if "fc.weight" in converted and "fc.weight" in expected:
        file_shape, our_shape = converted["fc.weight"][1].shape, expected["fc.weight"].shape
        if file_shape[0] != our_shape[0] and file_shape[1:] == our_shape[1:]:  # fine-tuning
            keys |= {"fc.weight", "fc.bias"}
            reasons.append(f"classifier fc ({file_shape[0]} classes in the file, {our_shape[0]} here)")
    se_keys = {key for key in expected if ".excitation." in key}
    if se_keys and not any(".excitation." in key for key in converted):  # a network without SE
        keys |= se_keys
        reasons.append(f"SE layers ({len(se_keys)} tensors), absent from the file")
    return keys, reasons


def _listed(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _misfits(converted: dict, expected: dict, kept_at_init: set[str]) -> str:
    """The missing, unexpected and shape-mismatched tensors (a few of each), or "" when all fit."""
    missing = [
        key for key in expected
        if key not in converted and key not in kept_at_init and not key.endswith("num_batches_tracked")
    ]  # fmt: skip
    unexpected = [source for key, (source, _) in converted.items() if key not in expected]
    mismatched = [
        key for key, (_, value) in converted.items() if key in expected and value.shape != expected[key].shape
    ]
    shapes = [
        f"{converted[key][0]} {tuple(converted[key][1].shape)} vs {tuple(expected[key].shape)}"
        for key in mismatched
    ]
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape file vs model", shapes))
        if keys
    ]
    if any(".excitation." in key for key in mismatched):
        problems.append(
            "the SE widths differ: check model.se.reduction; timm's seresnet18/34 round them up to "
            "a multiple of 8, its legacy_seresnet18/34 do not"
        )
    return "; ".join(problems)


def load_pretrained(model: nn.Module, model_name: str, path: Path | str, file_format: str = "auto") -> None:
    """Load the weights file `path` into `model` (built as `model_name`), refusing any misfit.

    `file_format`: "auto" (from the key names), "torchvision", "timm", "cadene" (also timm's
    legacy_* models) or "setrain" (a state dict or checkpoint of this project).
    """
    if file_format not in FORMATS:
        raise SetrainError(
            f"model.pretrained_format={file_format!r} is not known; choose one of: {', '.join(FORMATS)}."
        )
    state_dict = read_state_dict(path)
    layout = detect_layout(state_dict)
    if file_format != "auto" and layout not in _LAYOUTS[file_format]:
        raise SetrainError(
            f"Pretrained weights {path} have {_LAYOUT_NAMES[layout]} keys, not {file_format} ones; "
            "set model.pretrained_format=auto."
        )
    converted = convert_state_dict(state_dict, layout)
    expected = model.state_dict()
    kept_at_init, reasons = _kept_at_init(converted, expected)
    converted = {key: item for key, item in converted.items() if key not in kept_at_init}
    if misfits := _misfits(converted, expected, kept_at_init):
        raise SetrainError(
            f"Pretrained weights {path} ({_LAYOUT_NAMES[layout]} layout) do not fit model "
            f"{model_name} ({misfits}); choose the model the weights were trained as, with its "
            "default SE options."
        )

    changes = adapt_to_cadene_layout(model, model_name) if layout == "cadene" else []
    model.load_state_dict({**expected, **{key: value for key, (_, value) in converted.items()}})
    log.info(
        "Imported %d tensors from %s (%s layout) into %s%s%s",
        len(converted), path, _LAYOUT_NAMES[layout], model_name,
        f"; left at their init: {', '.join(reasons)}" if reasons else "",
        f"; adapted to the weights' layout: {', '.join(changes)}" if changes else "",
    )  # fmt: skip
