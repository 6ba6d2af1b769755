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
    """Registered model names matching a shell-style pattern, e.g. ``list_models("se_*")``."""
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
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise SetrainError(
            f"Model {name!r} does not take the option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted)}."
        )
    return factory(**kwargs)
