"""The Squeeze-and-Excitation block, defined once and used by every model family."""

import re

from torch import Tensor, nn

from setrain.errors import SetrainError

SQUEEZES = ("avg", "max")
GATES = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def check_choice(key: str, value, choices) -> None:
    """Refuse a value of the SE config key `model.se.<key>` that is not one of `choices`."""
    if value not in choices:
        raise SetrainError(
            f"model.se.{key}={value!r} is not known; choose one of: {', '.join(map(str, choices))}."
        )


def check_se_options(options: dict, accepted: tuple[str, ...]) -> None:
    """Refuse SE options (`model.se.*`) that a model family does not have."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SetrainError(
            f"Unknown SE option(s) {', '.join(unknown)} for this model; its SE options are "
            f"{', '.join(accepted)} (model.se.*)."
        )


class SEBlock(nn.Module):
    """Channel recalibration of Hu et al., "Squeeze-and-Excitation Networks" (Sec. 3).

    Squeeze: global pooling gives one descriptor per channel (Eq. 2); `squeeze="max"` is the
    max-pooling alternative of the paper's ablation (TPAMI Sec. 6.2).
    Excitation: FC C->C//r, ReLU, FC C//r->C and a gate per channel (Eq. 3); `gate="tanh"` or
    `"relu"` replace the sigmoid as in the ablation of TPAMI Sec. 6.3.
    Scale: the input is multiplied channel-wise by the gate (Eq. 4).
    The FCs carry biases, as in the paper's released models, so parameter counts match them.
    A 1x1 convolution on the squeezed 1x1 map (the released Caffe models, and kuangliu's pytorch-cifar SENet-18) computes the
    same function with the same parameters; weight import reshapes its kernels into these FCs.
    """

    def __init__(self, channels: int, reduction: int = 16, squeeze: str = "avg", gate: str = "sigmoid"):
        super().__init__()
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction <= 0:
            raise SetrainError(
                f"SE reduction ratio r={reduction!r} is invalid: it must be a positive integer "
                "such as 16 (set model.se.reduction)."
            )
        hidden = channels // reduction
        if hidden < 1:
            raise SetrainError(
                f"SE reduction ratio r={reduction} is too large for a layer of {channels} channels "
                f"({channels}//{reduction} = 0 hidden units); use r <= {channels} "
                "(set model.se.reduction)."
            )
        check_choice("squeeze", squeeze, SQUEEZES)
        check_choice("gate", gate, tuple(GATES))
        self.squeeze, self.gate = squeeze, gate
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            GATES[gate](),
        )

    def forward(self, x: Tensor) -> Tensor:
        gate = self.excitation(self.squeeze_channels(x))
        return x * gate[:, :, None, None]

    def squeeze_channels(self, x: Tensor) -> Tensor:
        """One descriptor per channel, shape (N, C).

        The mean is a sum divided on the small (N, C) result rather than `x.mean`: both give the
        same values, but the backward of `mean` writes a new gradient as large as `x` (its
        broadcast divided by H*W), while that of `sum` is a broadcast view, added in place to the
        scale's gradient: one pass over the feature map fewer per block in training
        (docs/benchmarks.md, Training speed).
        """
        if self.squeeze == "max":
            return x.amax(dim=(2, 3))
        return x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])


def se_blocks(model: nn.Module) -> dict[str, SEBlock]:
    """The SE blocks in forward order, named as in the paper's Fig. 6: SE_<stage>_<block> in
    ResNets (the stem is stage 1, so `layer1` is stage 2), SE_<n> in networks without stages."""
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, SEBlock):
            if stage := re.match(r"^layer(\d+)\.(\d+)\.", name):
                blocks[f"SE_{int(stage[1]) + 1}_{int(stage[2]) + 1}"] = module
            else:
                blocks[f"SE_{len(blocks) + 1}"] = module
    return blocks


def stage_of(block: str) -> str:
    """SE_4_2 -> "stage 4"; a block outside stages (MobileNetV1) is a depth of its own."""
    parts = block.split("_")
    return f"stage {parts[1]}" if len(parts) == 3 else block
