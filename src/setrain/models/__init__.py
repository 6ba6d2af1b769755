"""SE networks and their plain twins, built by name: ``create_model("se_resnet50", num_classes=10)``.

Add a variant by writing a small factory decorated with ``@register_model`` in the family's file
(or a new file imported below) and a YAML file of the same name in configs/model/.
"""

from setrain.models import resnet
from setrain.models.registry import create_model, list_models, register_model
from setrain.models.se import SEBlock

__all__ = ["SEBlock", "create_model", "list_models", "register_model", "resnet"]
