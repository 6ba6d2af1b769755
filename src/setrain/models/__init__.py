"""SE networks and their plain twins, built by name: ``create_model("se_resnet50", num_classes=10)``.

Add a variant by writing a small factory decorated with ``@register_model`` in the family's file
(or a new file imported below) and a YAML file of the same name in configs/model/.
`build_model` turns such a `model:` config into the network, as `setrain.data.build_data` does
for `data:`.
"""

from torch import nn

from setrain.models import mobilenet, resnet
from setrain.models.pretrained import load_pretrained
from setrain.models.registry import (
    create_model,
    is_se_model,
    list_models,
    plain_twin,
    register_model,
)
from setrain.models.released import IMAGENET, released_weights
from setrain.models.se import SEBlock

__all__ = [
    "SEBlock",
    "build_model",
    "create_model",
    "is_se_model",
    "list_models",
    "mobilenet",
    "plain_twin",
    "register_model",
    "resnet",
]


def build_model(model_cfg: dict, num_classes: int) -> nn.Module:
    """The model a `model:` config describes (configs/model/<name>.yaml).

    `name` picks the factory; the SE options under `se` and any other keys (e.g. `width_mult`)
    are its keyword arguments. `pretrained` names a weights file to import (see
    `setrain.models.pretrained`), or is `imagenet` for the model's released weights (see
    `setrain.models.released`); they are imported even when a run resumes, because a Cadene file
    also sets the layout, and the checkpoint's weights then replace the imported ones.
    """
    reserved = ("name", "se", "pretrained", "pretrained_format")
    options = {key: value for key, value in model_cfg.items() if key not in reserved}
    model = create_model(
        model_cfg["name"], num_classes=num_classes, **options, **model_cfg.get("se", {})
    )
    if (pretrained := model_cfg.get("pretrained")) is not None:
        path = released_weights(model_cfg["name"]) if pretrained == IMAGENET else pretrained
        load_pretrained(model, model_cfg["name"], path, model_cfg.get("pretrained_format", "auto"))
    return model
