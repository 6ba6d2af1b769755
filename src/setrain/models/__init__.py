"""SE networks and their plain twins, built by name: ``create_model("se_resnet50", num_classes=10)``.

Add a variant by writing a small factory decorated with ``@register_model`` in the family's file
(or a new file imported below) and a YAML file of the same name in configs/model/.
"""

from setrain.models import mobilenet, resnet
from setrain.models.registry import (
    build_model,
    create_model,
    is_se_model,
    list_models,
    plain_twin,
    register_model,
)
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
