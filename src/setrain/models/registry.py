"""Model registry: each variant is a small factory registered under its Hydra `model=` name."""

import fnmatch
import inspect
from typing import Callable

from torch import nn

from setrain.errors import SetrainError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `factory` under its function name; that name is what users type."""
    name = factory.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = factory
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern; ``list_models("se*")`` gives every SE model."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("se_resnet50", num_classes=10, reduction=8)``.

    Options a model does not take (such as `reduction` for a plain twin without SE) are
    refused rather than silently ignored, so a sweep never runs the wrong network.
    """
    if name not in _MODELS:
        raise SetrainError(
            f"Unknown model {name!r}; choose one of: {', '.join(list_models())}."
        )
    factory = _MODELS[name]
    parameters = inspect.signature(factory).parameters.values()
    accepted = [p.name for p in parameters if p.kind is not p.VAR_KEYWORD]
    takes_se_options = any(p.kind is p.VAR_KEYWORD for p in parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not takes_se_options:  # SE models check their `**se` options themselves
        raise SetrainError(
            f"Model {name!r} does not take the option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted)}."
        )
    return factory(**kwargs)


# Every SE model and its plain twin, the same network with SE off: the pairs that tests,
# scripts/model_table.py and SE-versus-plain comparisons take. A new SE model adds its line.
SE_TWINS = {
    "se_resnet18": "resnet18", "se_resnet34": "resnet34", "se_resnet50": "resnet50",
    "se_resnet101": "resnet101", "se_resnet152": "resnet152",
    "se_resnext50_32x4d": "resnext50_32x4d", "se_resnext101_32x4d": "resnext101_32x4d",
    "senet154": "resnext152_64x4d",
    "se_resnet20": "resnet20", "se_resnet32": "resnet32", "se_resnet56": "resnet56", "se_resnet110": "resnet110",
    "senet18_cifar": "resnet18_cifar",
    "se_mobilenet_v1": "mobilenet_v1",
}  # fmt: skip


def plain_twin(name: str) -> str:
    """The registered model that is `name` with SE off, e.g. ``plain_twin("se_resnet50") == "resnet50"``;
    a plain model is its own twin."""
    return SE_TWINS.get(name, name)


def is_se_model(name: str) -> bool:
    return name in SE_TWINS
