"""`model.pretrained=imagenet`: a model's released ImageNet weights, downloaded once into torch.hub's
cache ($TORCH_HOME/hub/checkpoints, which torchvision and timm share) with the file's published
hash checked, then imported like a local file by `setrain.models.pretrained`.

A failed download (offline, a cut-off or corrupt file) keeps nothing: torch.hub writes a
temporary file and moves it into the cache only once its sha256 matches.
"""

import logging
import os
from http.client import HTTPException
from pathlib import Path
from urllib.error import URLError

import torch.hub

from setrain.errors import SetrainError

log = logging.getLogger(__name__)

IMAGENET = "imagenet"  # the value of model.pretrained that asks for these weights
MIRROR_VARIABLE = "SETRAIN_WEIGHTS_URL"  # a base URL that serves the same file names

_TIMM = "https://github.com/rwightman/pytorch-image-models/releases/download"
_TORCHVISION = "https://download.pytorch.org/models"
# Each URL is copied from its publisher's source code. Every file name ends in the first digits of
# the file's sha256 (torch.hub's convention, read by torch.hub.HASH_REGEX), which the download
# checks; the publishers give no other hash. The files were not downloaded when this table was
# written (no internet there), so the hashes are the publishers' and unverified by us.
RELEASED = {
    # The authors' SENets (their Caffe models converted by Cadene: pretrained-models.pytorch,
    # pretrainedmodels/models/senet.py, served from data.lip6.fr), as timm mirrors them on GitHub
    # (huggingface/pytorch-image-models, timm/models/senet.py, legacy_*.in1k): SE-ResNet-50/101/152
    # under Cadene's file names and hashes; SE-ResNeXt-50/101 and SENet-154 under timm's own
    # (Cadene's were se_resnext50_32x4d-a260b3a4, se_resnext101_32x4d-3b2fe3d8, senet154-c7b49a05).
    "se_resnet50": f"{_TIMM}/v0.1-cadene/se_resnet50-ce0d4300.pth",
    "se_resnet101": f"{_TIMM}/v0.1-cadene/se_resnet101-7e38fcc6.pth",
    "se_resnet152": f"{_TIMM}/v0.1-cadene/se_resnet152-d17c99b7.pth",
    "se_resnext50_32x4d": f"{_TIMM}/v0.1-weights/legacy_se_resnext50_32x4d-f3651bad.pth",
    "se_resnext101_32x4d": f"{_TIMM}/v0.1-weights/legacy_se_resnext101_32x4d-37725eac.pth",
    "senet154": f"{_TIMM}/v0.1-weights/legacy_senet154-e9eb9fe6.pth",
    # Trained by timm in the same layout (the authors released no SE-ResNet-18/34): legacy_seresnet18/34.
    "se_resnet18": f"{_TIMM}/v0.1-weights/seresnet18-4bb0ce65.pth",
    "se_resnet34": f"{_TIMM}/v0.1-weights/seresnet34-a4004e63.pth",
    # The plain twins: torchvision's IMAGENET1K_V1 (pytorch/vision, torchvision/models/resnet.py),
    # trained with the recipe of the SENets' time, so that a twin compares fairly with its SE model.
    # torchvision's ResNeXt-101 is 32x8d, not our 32x4d, so resnext101_32x4d has none.
    "resnet18": f"{_TORCHVISION}/resnet18-f37072fd.pth",
    "resnet34": f"{_TORCHVISION}/resnet34-b627a593.pth",
    "resnet50": f"{_TORCHVISION}/resnet50-0676ba61.pth",
    "resnet101": f"{_TORCHVISION}/resnet101-63fe2227.pth",
    "resnet152": f"{_TORCHVISION}/resnet152-394f9c45.pth",
    "resnext50_32x4d": f"{_TORCHVISION}/resnext50_32x4d-7cdf4587.pth",
}


def released_weights(model_name: str) -> Path:
    """The cached weights file of `model_name`, downloaded first when the cache lacks it."""
    if model_name not in RELEASED:
        raise SetrainError(
            f"Model {model_name} has no released ImageNet weights; model.pretrained={IMAGENET} works for "
            f"{', '.join(RELEASED)}; for another model give a weights file, model.pretrained=<file>."
        )
    file_name = RELEASED[model_name].rsplit("/", 1)[1]
    mirror = os.environ.get(MIRROR_VARIABLE)
    url = f"{mirror.rstrip('/')}/{file_name}" if mirror else RELEASED[model_name]
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not path.is_file():
        _download(url, path)
    return path


def _download(url: str, path: Path) -> None:
    """`url` into `path` through torch.hub, or one sentence saying why not and what to do instead."""
    hash_prefix = torch.hub.HASH_REGEX.search(path.name).group(1)
    instead = f"or download {url} yourself and set model.pretrained=<that file>"
    log.info("Downloading %s to %s", url, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix)
    except RuntimeError as error:  # torch.hub's hash check, its only RuntimeError
        raise SetrainError(
            f"The file downloaded from {url} does not have its published sha256 ({hash_prefix}...): "
            f"it was cut off or is corrupt, and nothing was kept; run again, {instead}."
        ) from error
    except (URLError, HTTPException, ConnectionError, TimeoutError) as error:
        reason = error.reason if isinstance(error, URLError) and not hasattr(error, "code") else error
        raise SetrainError(
            f"Could not download {url} ({reason}); check the connection (or point {MIRROR_VARIABLE} "
            f"at a mirror), {instead}."
        ) from error
    except OSError as error:
        raise SetrainError(
            f"Could not save the weights into {path.parent} ({error.strerror or error}); free space "
            f"there or set TORCH_HOME to a writable folder, {instead}."
        ) from error
