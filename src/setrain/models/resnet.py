"""ResNet family with optional SE: SE-ResNet, SE-ResNeXt and SENet-154 are one class with different arguments.

SE sits on the residual branch after the last BN and before the addition with the shortcut,
the "SE-ResNet module" of the paper's Fig. 3; `placement` moves it as in the paper's Fig. 5.
Shortcuts that change shape are 1x1 conv + BN (option B of He et al.), so the ImageNet models
equal torchvision's ResNets/ResNeXts and the released SENets parameter for parameter. Layers
carry torchvision's names (conv1, bn1, layer1.0.conv2, layer1.0.downsample.0, fc), so its files
load as they are; SE adds `se` to each block, as in timm.
"""

import re
from typing import Sequence

from torch import Tensor, nn

from setrain.errors import SetrainError
from setrain.models.fused_se import FoldCache, folded_tail, fused_form, fused_setting, se_residual_tail
from setrain.models.layers import conv_bn_relu
from setrain.models.registry import register_model
from setrain.models.se import SEBlock, check_choice, check_se_options

PLACEMENTS = ("standard", "pre", "post", "identity")
SE_OPTIONS = ("reduction", "squeeze", "gate", "placement", "stages", "fused")


def _downsample(in_channels: int, out_channels: int, stride: int, kernel_size: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    kernel_size = kernel_size if stride > 1 else 1
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualBlock(nn.Module):
    """What BasicBlock and Bottleneck share: SE, the shortcut and the forward pass.

    A block's branch is conv1, bn1, ReLU, ..., conv<n>, bn<n> (`depth` pairs, built by the
    subclass before `_add_se_and_downsample`, so parameters keep torchvision's order).
    `placement` is where SE acts (TPAMI Sec. 6.5, Fig. 5): "standard" on the residual branch
    before the addition, "pre" on the input of the residual branch, "post" after the addition
    and its ReLU, "identity" on the shortcut, in parallel to the residual branch.
    `fused` (True, False or "auto", see `fused_se`): the standard placement's last BN, SE,
    addition and ReLU in a few passes, with the same parameters and results; in eval mode without
    autograd, with BN folded into the last conv (the constants in `fold_cache`).
    """

    expansion = 1
    depth = 2

    def _add_se_and_downsample(
        self, in_channels: int, out_channels: int, stride: int, se: dict | None, placement: str,
        down_kernel_size: int, fused,
    ) -> None:  # fmt: skip
        self.relu = nn.ReLU(inplace=True)
        se_channels = in_channels if placement == "pre" else out_channels
        self.se = SEBlock(se_channels, **se) if se is not None else nn.Identity()
        self.placement = placement
        self.fused = fused if se is not None else False
        self.fold_cache = FoldCache()
        self.downsample = _downsample(in_channels, out_channels, stride, down_kernel_size)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return getattr(self, f"bn{self.depth}")

    @property
    def last_conv(self) -> nn.Conv2d:
        return getattr(self, f"conv{self.depth}")

    def last_conv_input(self, x: Tensor) -> Tensor:
        """The residual branch up to its last conv."""
        for number in range(1, self.depth):
            x = self.relu(getattr(self, f"bn{number}")(getattr(self, f"conv{number}")(x)))
        return x

    def residual(self, x: Tensor, last_bn: bool = True) -> Tensor:
        """The residual branch; without its last BN when `last_bn` is false (the fused tail applies it)."""
        x = self.last_conv(self.last_conv_input(x))
        return self.last_bn(x) if last_bn else x

    def forward(self, x: Tensor) -> Tensor:
        form = fused_form(self.fused, x, self.last_conv, self.last_bn, self.se)
        if form == "folded":
            h = self.last_conv_input(x)
            return folded_tail(h, self.downsample(x), self.last_conv, self.last_bn, self.se, self.fold_cache)
        if form == "op":
            return se_residual_tail(self.residual(x, last_bn=False), self.downsample(x), self.last_bn, self.se)
        branch = self.residual(self.se(x) if self.placement == "pre" else x)
        if self.placement == "standard":
            branch = self.se(branch)
        shortcut = self.downsample(x)
        if self.placement == "identity":
            shortcut = self.se(shortcut)
        branch += shortcut  # in place, as torchvision and timm: one feature map fewer to allocate
        out = self.relu(branch)
        return self.se(out) if self.placement == "post" else out


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets), SE, and the shortcut."""

    def __init__(
        self, in_channels: int, planes: int, stride: int, se: dict | None = None,
        placement: str = "standard", down_kernel_size: int = 1, fused=False,
    ):  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._add_se_and_downsample(in_channels, planes, stride, se, placement, down_kernel_size, fused)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision), 1x1 expand, SE, and the shortcut.

    ResNet-50/101/152 use one group of `planes` channels; ResNeXt's 32x4d uses `groups=32` of
    `width_per_group=4` channels in the 3x3. SENet-154 halves the first 1x1 (`reduce_first=2`).
    """

    expansion = 4
    depth = 3

    def __init__(
        self, in_channels: int, planes: int, stride: int, se: dict | None = None,
        placement: str = "standard", down_kernel_size: int = 1, fused=False,
        groups: int = 1, width_per_group: int = 64, reduce_first: int = 1,
    ):  # fmt: skip
        super().__init__()
        width = planes * width_per_group // 64 * groups
        first = width // reduce_first
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, first, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(first)
        self.conv2 = nn.Conv2d(first, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self._add_se_and_downsample(in_channels, out_channels, stride, se, placement, down_kernel_size, fused)


def _stem_conv(kind: str, in_chans: int, width: int) -> tuple[nn.Module, int]:
    """conv1, the convs before the stem's BN, ReLU and max pool, and its output channels."""
    if kind == "imagenet":  # 7x7/2 conv and 3x3/2 max pool for 224 px (He et al. Table 1)
        return nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False), width
    if kind == "deep":  # SENet-154: three 3x3 convs replace the 7x7 (TPAMI Sec. 4, appendix), as timm's conv1
        layers = conv_bn_relu(in_chans, width, 3, 2) + conv_bn_relu(width, width, 3, 1)
        return nn.Sequential(*layers, nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)), 2 * width
    if kind == "cifar":  # one 3x3 conv at full resolution for 32 px (He et al. Sec. 4.2), no max pool
        return nn.Conv2d(in_chans, width, 3, padding=1, bias=False), width
    raise ValueError(f"unknown stem {kind!r}; expected 'imagenet', 'deep' or 'cifar'")


def _se_per_stage(se: dict | None, num_stages: int) -> tuple[list[dict | None], str, object]:
    """Split the SE options into the SEBlock options of each stage, the placement and `fused`.

    Stages are numbered as in the paper (TPAMI Sec. 6.4): the stem is stage 1, so the residual
    stages of ResNet-50 (conv2_x .. conv5_x) are 2..5; `stages=None` puts SE in all of them.
    """
    if se is None:
        return [None] * num_stages, "standard", False
    check_se_options(se, SE_OPTIONS)
    block_options = dict(se)
    placement = block_options.pop("placement", "standard")
    check_choice("placement", placement, PLACEMENTS)
    fused = fused_setting(block_options.pop("fused", "auto"), placement, block_options.get("squeeze", "avg"))
    numbers = list(range(2, num_stages + 2))
    stages = block_options.pop("stages", None)
    stages = numbers if stages is None else list(stages)
    if not set(stages) <= set(numbers):
        raise SetrainError(
            f"model.se.stages={stages} names stages this network does not have; its residual "
            f"stages are {numbers} (paper numbering: the stem is stage 1), or null for all."
        )
    return [block_options if number in stages else None for number in numbers], placement, fused


class ResNet(nn.Module):
    """A stem, stages of residual blocks (the first at stride 1, the rest at stride 2), a classifier.

    `stem`: "imagenet", "deep" (SENet-154) or "cifar", see `_stem_conv`.
    `se`: the SE options (reduction, squeeze, gate, placement, stages, fused), or None for the plain
    network. `block_args`: the block's branch options (groups, width_per_group, reduce_first).
    `down_kernel_size`: 3 gives SENet-154's 3x3 strided projection shortcuts.
    `dropout`: before the classifier (0.2 in SENet-154).
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_chans: int = 3,
        se: dict | None = None,
        block_args: dict | None = None,
        down_kernel_size: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.native_input_size = 32 if stem == "cifar" else 224  # what the design was made for
        self.conv1, in_channels = _stem_conv(stem, in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, stride=2, padding=1)
        stage_se, placement, fused = _se_per_stage(se, len(layers))
        self.num_stages = len(layers)
        for index, (depth, width) in enumerate(zip(layers, widths)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(
                    block(
                        in_channels, width, stride, stage_se[index], placement, down_kernel_size,
                        fused, **(block_args or {}),
                    )
                )
                in_channels = width * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stages(self) -> list[nn.Sequential]:
        """layer1, layer2, ...: the paper's stages 2, 3, ... (the stem is stage 1)."""
        return [getattr(self, f"layer{number}") for number in range(1, self.num_stages + 1)]

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.avgpool(self.forward_features(x)).flatten(1)))


def renamed_from_sequential_layout(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ResNet state dict saved by setrain before its layers took torchvision's names
    (`stem.0`, `stages.1.0.residual.3`, `shortcut`), renamed to today's (`conv1`, `layer2.0.conv2`,
    `downsample`); any other state dict is returned as it is. Parameters kept their order, so
    the optimizer state saved beside such weights still fits."""
    if not any(re.match(r"^(module\.)?stages\.", key) for key in state_dict):
        return state_dict
    deep_stem = any(re.match(r"^(module\.)?stem\.7\.", key) for key in state_dict)
    return {_renamed_key(key, deep_stem): value for key, value in state_dict.items()}


def _renamed_key(key: str, deep_stem: bool) -> str:
    prefix, key = ("module.", key.removeprefix("module.")) if key.startswith("module.") else ("", key)
    if match := re.match(r"^stem\.(\d+)\.(.*)$", key):
        index, rest = int(match[1]), match[2]
        if deep_stem:  # conv-BN-ReLU x3, then a max pool: the third BN is bn1, the rest conv1
            return prefix + (f"bn1.{rest}" if index == 7 else f"conv1.{index}.{rest}")
        return prefix + f"{'conv1' if index == 0 else 'bn1'}.{rest}"
    if match := re.match(r"^stages\.(\d+)\.(\d+)\.(.*)$", key):
        stage, block, rest = int(match[1]), match[2], match[3]
        if branch := re.match(r"^residual\.(\d+)\.(.*)$", rest):  # (conv, BN, ReLU) triples
            index = int(branch[1])
            rest = f"{'bn' if index % 3 else 'conv'}{index // 3 + 1}.{branch[2]}"
        rest = re.sub(r"^shortcut\.", "downsample.", rest)
        return prefix + f"layer{stage + 1}.{block}.{rest}"
    return prefix + key


# Every SE factory takes `**se`: the SE options of ResNet (reduction, squeeze, gate, placement,
# stages, fused), which configs/model/<name>.yaml lists under `se:`.

# ImageNet ResNets (He et al. Table 1) and SE-ResNets (Hu et al. Table 1).


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-18, plain twin of se_resnet18."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet18(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-18."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-34, plain twin of se_resnet34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet34(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet50(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-50, plain twin of se_resnet50: 25.6M parameters at 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet50(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-50: 28.1M parameters at 1000 classes and r=16 (paper Table 10)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet101(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-101, plain twin of se_resnet101."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet101(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-101."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans, se=se)


@register_model
def resnet152(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNet-152, plain twin of se_resnet152."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans)


@register_model
def se_resnet152(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-152."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans, se=se)


# ResNeXt (Xie et al.) and SE-ResNeXt (Hu et al. Table 1): 32 groups of 4 channels in the 3x3.

_RESNEXT_32X4D = dict(groups=32, width_per_group=4)


@register_model
def resnext50_32x4d(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNeXt-50 (32x4d), plain twin of se_resnext50_32x4d."""
    return ResNet(
        Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, block_args=_RESNEXT_32X4D
    )


@register_model
def se_resnext50_32x4d(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNeXt-50 (32x4d): 27.6M parameters at 1000 classes (paper Table 2)."""
    return ResNet(
        Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, se=se,
        block_args=_RESNEXT_32X4D,
    )


@register_model
def resnext101_32x4d(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """ResNeXt-101 (32x4d), plain twin of se_resnext101_32x4d."""
    return ResNet(
        Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans, block_args=_RESNEXT_32X4D
    )


@register_model
def se_resnext101_32x4d(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNeXt-101 (32x4d): 49.0M parameters at 1000 classes."""
    return ResNet(
        Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans, se=se,
        block_args=_RESNEXT_32X4D,
    )


# SENet-154 (TPAMI appendix): a 64x4d ResNeXt-152 with a 3-conv stem, a halved first 1x1 in each
# block, 3x3 strided projection shortcuts and dropout 0.2 before the classifier.

_SENET154 = dict(
    stem="deep", block_args=dict(groups=64, width_per_group=4, reduce_first=2), down_kernel_size=3,
    dropout=0.2,
)


@register_model
def resnext152_64x4d(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """SENet-154 without SE: its plain twin, with the same stem, shortcuts and dropout."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans, **_SENET154)


@register_model
def senet154(num_classes: int = 1000, in_chans: int = 3, **se) -> ResNet:
    """SENet-154, the ILSVRC 2017 winner: 115.1M parameters at 1000 classes."""
    return ResNet(
        Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans, se=se, **_SENET154
    )


# CIFAR ResNets (He et al. Sec. 4.2): three stages of 16/32/64 channels at 32 px, 6n+2 layers.

_CIFAR_WIDTHS = (16, 32, 64)


def _cifar_resnet(blocks_per_stage: int, num_classes: int, in_chans: int, se: dict | None) -> ResNet:
    return ResNet(
        BasicBlock, [blocks_per_stage] * 3, _CIFAR_WIDTHS, "cifar", num_classes, in_chans, se=se
    )


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """ResNet-20 for 32 px images, plain twin of se_resnet20."""
    return _cifar_resnet(3, num_classes, in_chans, se=None)


@register_model
def se_resnet20(num_classes: int = 10, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-20 for 32 px images; its narrowest SE layer has 16 channels, so r <= 16."""
    return _cifar_resnet(3, num_classes, in_chans, se)


@register_model
def resnet32(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """ResNet-32 for 32 px images, plain twin of se_resnet32."""
    return _cifar_resnet(5, num_classes, in_chans, se=None)


@register_model
def se_resnet32(num_classes: int = 10, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-32 for 32 px images."""
    return _cifar_resnet(5, num_classes, in_chans, se)


@register_model
def resnet56(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """ResNet-56 for 32 px images, plain twin of se_resnet56."""
    return _cifar_resnet(9, num_classes, in_chans, se=None)


@register_model
def se_resnet56(num_classes: int = 10, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-56 for 32 px images."""
    return _cifar_resnet(9, num_classes, in_chans, se)


@register_model
def resnet110(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """ResNet-110 for 32 px images, plain twin of se_resnet110."""
    return _cifar_resnet(18, num_classes, in_chans, se=None)


@register_model
def se_resnet110(num_classes: int = 10, in_chans: int = 3, **se) -> ResNet:
    """SE-ResNet-110 for 32 px images."""
    return _cifar_resnet(18, num_classes, in_chans, se)


# The 18-layer CIFAR SENet of kuangliu's pytorch-cifar (as a blog post on SENet trains it): ResNet-18 widths,
# a 3x3 stem at full resolution. Its 1x1-conv excitation is SEBlock's FCs (see SEBlock).


@register_model
def resnet18_cifar(num_classes: int = 10, in_chans: int = 3) -> ResNet:
    """ResNet-18 for 32 px images, plain twin of senet18_cifar."""
    return ResNet(BasicBlock, [2, 2, 2, 2], stem="cifar", num_classes=num_classes, in_chans=in_chans)


@register_model
def senet18_cifar(num_classes: int = 10, in_chans: int = 3, **se) -> ResNet:
    """SENet-18 for 32 px images (kuangliu's pytorch-cifar layout): 11.26M parameters at 10 classes."""
    return ResNet(
        BasicBlock, [2, 2, 2, 2], stem="cifar", num_classes=num_classes, in_chans=in_chans, se=se
    )
