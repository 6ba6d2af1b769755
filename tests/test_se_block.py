import pytest
import torch

from setrain.errors import SetrainError
from setrain.models import SEBlock


def test_output_has_input_shape_and_hidden_width_is_c_over_r():
    block = SEBlock(64, reduction=16)
    x = torch.randn(2, 64, 5, 7)
    assert block(x).shape == x.shape
    first, _, second, _ = block.excitation
    assert (first.in_features, first.out_features) == (64, 4)
    assert (second.in_features, second.out_features) == (4, 64)
    assert first.bias is not None and second.bias is not None


def test_output_is_input_scaled_by_a_gate_from_the_channel_means():
    torch.manual_seed(0)
    block = SEBlock(8, reduction=2)
    x = torch.randn(3, 8, 4, 4)
    first, _, second, _ = block.excitation
    squeezed = x.mean(dim=(2, 3))
    gate = torch.sigmoid(second(torch.relu(first(squeezed))))
    torch.testing.assert_close(block(x), x * gate[:, :, None, None])
    assert ((gate > 0) & (gate < 1)).all()


def test_gate_depends_on_the_whole_spatial_extent():
    """Changing one far-away pixel changes the scale of every position (global context)."""
    torch.manual_seed(0)
    block = SEBlock(4, reduction=2)
    x = torch.randn(1, 4, 6, 6)
    changed = x.clone()
    changed[0, :, 5, 5] += 10.0
    ratio_before = block(x)[0, :, 0, 0] / x[0, :, 0, 0]
    ratio_after = block(changed)[0, :, 0, 0] / changed[0, :, 0, 0]
    assert not torch.allclose(ratio_before, ratio_after)


@pytest.mark.parametrize("reduction", [0, -4, 2.5, True])
def test_reduction_must_be_a_positive_integer(reduction):
    with pytest.raises(SetrainError, match="model.se.reduction"):
        SEBlock(64, reduction=reduction)


def test_reduction_too_large_names_the_layer_width():
    SEBlock(16, reduction=16)  # one hidden unit is the smallest bottleneck
    with pytest.raises(SetrainError, match="layer of 16 channels.*r <= 16"):
        SEBlock(16, reduction=32)
