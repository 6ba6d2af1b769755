"""ResNet family with optional SE: SE-ResNet and its plain twin are one class with different arguments.

SE sits on the residual branch after the last BN and before the addition with the shortcut,
the "SE-ResNet module" of the paper's Fig. 3. Shortcuts that change shape are 1x1 conv + BN
(option B of He et al.), so the ImageNet models equal torchvision's ResNets parameter for parameter.
"""

from typing import Sequence

from torch import Tensor, nn

from setrain.models.registry import register_model
from setrain.models.se import SEBlock


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets), SE, and the shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, se: dict | None):
        super().__init__()
        out_channels = width * self.expansion
        self.residual = self.residual_branch(in_channels, width, stride)
        self.se = SEBlock(out_channels, **se) if se is not None else nn.Identity()
        self.shortcut = _projection(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def residual_branch(in_channels: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.se(self.residual(x)) + self.shortcut(x))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision), 1x1 expand (ResNet-50/101/152)."""

    expansion = 4

    @staticmethod
    def residual_branch(in_channels: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width * Bottleneck.expansion, 1, bias=False),
            nn.BatchNorm2d(width * Bottleneck.expansion),
        )


class ResNet(nn.Module):
    """A stem, stages of residual blocks (the first at stride 1, the rest at stride 2), a classifier.

    `stem="imagenet"`: 7x7/2 conv and 3x3/2 max pool for 224 px inputs (He et al. Table 1).
    `stem="cifar"`: one 3x3 conv at full resolution for 32 px inputs (He et al. Sec. 4.2).
    `se`: keyword arguments of SEBlock for every block, or None for the plain network.
    """

    def __init__(
        self,
        block: type[BasicBlock],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_chans: int = 3,
        se: dict | None = None,
    ):
        super().__init__()
        stem_width = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        elif stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
            )
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")

        stages, in_channels = [], stem_width
        for index, (depth, width) in enumerate(zip(layers, widths)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(block(in_channels, width, stride, se))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


# ImageNet ResNets (He et al. Table 1) and SE-ResNets (Hu et al. Table 1).


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-18, plain twin of se_resnet18."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet18(num_classes: int = 1000, in_chans: int = 3, reduction: int = 16) -> ResNet:
    """SE-ResNet-18."""
    se = dict(reduction=reduction)
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-34, plain twin of se_resnet34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet34(num_classes: int = 1000, in_chans: int = 3, reduction: int = 16) -> ResNet:
    """SE-ResNet-34."""
    se = dict(reduction=reduction)
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet50(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-50, plain twin of se_resnet50: 25.6M parameters at 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet50(num_classes: int = 1000, in_chans: int = 3, reduction: int = 16) -> ResNet:
    """SE-ResNet-50: 28.1M parameters at 1000 classes and r=16 (paper Table 10)."""
    se = dict(reduction=reduction)
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet101(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-101, plain twin of se_resnet101."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet101(num_classes: int = 1000, in_chans: int = 3, reduction: int = 16) -> ResNet:
    """SE-ResNet-101."""
    se = dict(reduction=reduction)
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet152(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-152, plain twin of se_resnet152."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet152(num_classes: int = 1000, in_chans: int = 3, reduction: int = 16) -> ResNet:
    """SE-ResNet-152."""
    se = dict(reduction=reduction)
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans, se=se)


# CIFAR ResNets (He et al. Sec. 4.2): three stages of 16/32/64 channels at 32 px.

_CIFAR_WIDTHS = (16, 32, 64)


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """ResNet-20 for 32 px images, plain twin of se_resnet20."""
    return ResNet(
        BasicBlock, [3, 3, 3], _CIFAR_WIDTHS, "cifar", num_classes=num_classes, in_chans=in_chans
    )


@register_model
def se_resnet20(num_classes: int = 10, in_chans: int = 3, reduction: int = 16) -> ResNet:
    """SE-ResNet-20 for 32 px images; its narrowest SE layer has 16 channels, so r <= 16."""
    se = dict(reduction=reduction)
    return ResNet(
        BasicBlock, [3, 3, 3], _CIFAR_WIDTHS, "cifar", num_classes=num_classes, in_chans=in_chans, se=se
    )
