"""Small building blocks shared by the model families (the SE block itself is in se.py)."""

from torch import nn


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1
) -> list[nn.Module]:
    """A bias-free "same"-padded conv, BN and ReLU, as a list to splice into an nn.Sequential."""
    return [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
