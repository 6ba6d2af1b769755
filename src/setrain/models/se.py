"""The Squeeze-and-Excitation block, defined once and used by every model family."""

from torch import Tensor, nn

from setrain.errors import SetrainError


class SEBlock(nn.Module):
    """Channel recalibration of Hu et al., "Squeeze-and-Excitation Networks" (Sec. 3).

    Squeeze: global average pooling gives one descriptor per channel (Eq. 2).
    Excitation: FC C->C//r, ReLU, FC C//r->C, sigmoid gives a gate per channel (Eq. 3).
    Scale: the input is multiplied channel-wise by the gate (Eq. 4).
    The FCs carry biases, as in the paper's released models, so parameter counts match them.
    """

    def __init__(self, channels: int, reduction: int = 16):
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
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        squeezed = x.mean(dim=(2, 3))
        gate = self.excitation(squeezed)
        return x * gate[:, :, None, None]
