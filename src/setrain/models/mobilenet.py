"""MobileNetV1 (Howard et al. 2017) with optional SE, the model of the STL10 recipe in a blog review of SENet (experiment=se_mobilenet_stl10).

SE follows each depthwise-separable block, on the pointwise conv's output, as in that review. The
review's own code has a 64x64 stem kernel and a stride-2 last block; this follows the MobileNet
paper (Table 1): a 3x3/2 stem of 32 channels and the last block at stride 1 (the paper's table
lists s2 there, but its 7x7 output map, and the reference TensorFlow model, need stride 1).
"""

from torch import Tensor, nn

from setrain.models.layers import conv_bn_relu
from setrain.models.registry import register_model
from setrain.models.se import SEBlock, check_se_options

# (output channels, stride) of the 13 depthwise-separable blocks at width multiplier 1.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
    (1024, 2),
    (1024, 1),
]
SE_OPTIONS = ("reduction", "squeeze", "gate")


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv, 1x1 pointwise conv (each with BN and ReLU), then SE (or nothing)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, se: dict | None):
        super().__init__(
            *conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels),
            *conv_bn_relu(in_channels, out_channels, 1, 1),
            SEBlock(out_channels, **se) if se is not None else nn.Identity(),
        )


class MobileNetV1(nn.Module):
    """MobileNetV1; `width_mult` (the paper's alpha) scales every layer's channels."""

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, se: dict | None = None
    ):
        super().__init__()
        if se is not None:
            check_se_options(se, SE_OPTIONS)
        self.native_input_size = 224  # what the design was made for
        in_channels = int(32 * width_mult)
        self.stem = nn.Sequential(*conv_bn_relu(in_chans, in_channels, 3, 2))
        blocks = []
        for channels, stride in _BLOCKS:
            blocks.append(DepthwiseSeparable(in_channels, int(channels * width_mult), stride, se))
            in_channels = int(channels * width_mult)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


@register_model
def mobilenet_v1(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0) -> MobileNetV1:
    """MobileNetV1, plain twin of se_mobilenet_v1: 4.23M parameters at 1000 classes."""
    return MobileNetV1(num_classes, in_chans, width_mult)


@register_model
def se_mobilenet_v1(
    num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, **se
) -> MobileNetV1:
    """SE-MobileNetV1 of the STL10 seed; SE options: reduction, squeeze, gate."""
    return MobileNetV1(num_classes, in_chans, width_mult, se=se)
