"""Each SE switch of the paper's ablations (TPAMI Sec. 6) changes the computation as described."""

import pytest
import torch
from torch import nn

from setrain.errors import SetrainError
from setrain.models import SEBlock, create_model
from setrain.models.resnet import BasicBlock, Bottleneck


def excite(block: SEBlock, squeezed: torch.Tensor, gate) -> torch.Tensor:
    first, _, second, _ = block.excitation
    return gate(second(torch.relu(first(squeezed))))


@pytest.mark.parametrize("squeeze, pool", [("avg", torch.mean), ("max", torch.amax)])
def test_squeeze_pools_each_channel_by_mean_or_max(squeeze, pool):
    torch.manual_seed(0)
    block = SEBlock(8, reduction=2, squeeze=squeeze)
    x = torch.randn(3, 8, 5, 5)
    gate = excite(block, pool(x, dim=(2, 3)), torch.sigmoid)
    torch.testing.assert_close(block(x), x * gate[:, :, None, None])


def test_max_and_average_squeeze_differ():
    torch.manual_seed(0)
    avg, mx = SEBlock(8, 2, squeeze="avg"), SEBlock(8, 2, squeeze="max")
    mx.load_state_dict(avg.state_dict())
    x = torch.randn(2, 8, 4, 4)
    assert not torch.allclose(avg(x), mx(x))


@pytest.mark.parametrize("gate, function", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("relu", torch.relu)])
def test_gate_nonlinearity(gate, function):
    torch.manual_seed(0)
    block = SEBlock(8, reduction=2, gate=gate)
    x = torch.randn(4, 8, 3, 3)
    scale = excite(block, x.mean(dim=(2, 3)), function)
    torch.testing.assert_close(block(x), x * scale[:, :, None, None])


@pytest.mark.parametrize("gate, logit, scale", [("sigmoid", 3.0, 0.95257), ("tanh", -3.0, -0.99505), ("relu", 3.0, 3.0)])
def test_sigmoid_only_attenuates_tanh_can_flip_and_relu_amplify_a_channel(gate, logit, scale):
    """With the excitation's last layer a constant `logit`, every channel is scaled by gate(logit)."""
    block = SEBlock(8, reduction=2, gate=gate)
    nn.init.zeros_(block.excitation[2].weight)
    nn.init.constant_(block.excitation[2].bias, logit)
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(block(x), x * scale, rtol=1e-4, atol=1e-5)


def test_unknown_squeeze_or_gate_lists_the_choices():
    with pytest.raises(SetrainError, match="model.se.squeeze='median'.*avg, max"):
        SEBlock(8, 2, squeeze="median")
    with pytest.raises(SetrainError, match="model.se.gate='softmax'.*sigmoid, tanh, relu"):
        SEBlock(8, 2, gate="softmax")


def expected_output(block: BasicBlock, x: torch.Tensor, placement: str) -> torch.Tensor:
    """The integration strategies of the paper's Fig. 5, written out from the block's parts."""
    se, residual, shortcut = block.se, block.residual, block.downsample
    if placement == "standard":
        return torch.relu(se(residual(x)) + shortcut(x))
    if placement == "pre":
        return torch.relu(residual(se(x)) + shortcut(x))
    if placement == "post":
        return se(torch.relu(residual(x) + shortcut(x)))
    return torch.relu(residual(x) + se(shortcut(x)))


@pytest.mark.parametrize("block_class", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("placement", ["standard", "pre", "post", "identity"])
def test_placement_moves_se_as_in_fig_5(block_class, placement):
    torch.manual_seed(0)
    block = block_class(16, 8, 2, se=dict(reduction=4), placement=placement).eval()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), expected_output(block, x, placement))
    se_input_channels = 16 if placement == "pre" else 8 * block_class.expansion
    assert block.se.excitation[0].in_features == se_input_channels


@pytest.mark.parametrize("placement", ["standard", "pre", "post", "identity"])
def test_each_placement_is_a_different_function(placement):
    torch.manual_seed(0)
    block = Bottleneck(32, 8, 1, se=dict(reduction=4), placement=placement).eval()  # SE width 32 everywhere
    x = torch.randn(2, 32, 6, 6)
    others = [p for p in ("standard", "pre", "post", "identity") if p != placement]
    assert not any(torch.allclose(block(x), expected_output(block, x, p)) for p in others)


def test_post_placement_can_scale_the_output_to_zero():
    """SE-POST acts after the addition: a closed gate silences the whole unit, shortcut included."""
    block = BasicBlock(8, 8, 1, se=dict(reduction=2), placement="post").eval()
    nn.init.constant_(block.se.excitation[2].bias, -1e4)
    assert block(torch.randn(1, 8, 4, 4)).abs().max() == 0


def se_stages(model) -> list[int]:
    """Paper numbers of the stages holding SE blocks (stem = stage 1)."""
    return [
        number
        for number, stage in enumerate(model.stages(), start=2)
        if any(isinstance(m, SEBlock) for m in stage.modules())
    ]


def test_stages_puts_se_only_in_the_chosen_stages():
    """TPAMI Sec. 6.4: SE_Stage_4 of ResNet-50 adds SE to conv4_x (1024 channels) only."""
    with torch.device("meta"):
        model = create_model("se_resnet50", stages=[4])
        every = create_model("se_resnet50")
    assert se_stages(model) == [4] and se_stages(every) == [2, 3, 4, 5]
    widths = {m.excitation[0].in_features for m in model.modules() if isinstance(m, SEBlock)}
    assert widths == {1024}
    params = sum(p.numel() for p in model.parameters())
    assert params / 1e6 == pytest.approx(26.4, abs=0.06)  # 26.35M; the paper lists 26.4M


def test_no_stage_is_the_plain_twin_and_a_wrong_stage_is_refused():
    with torch.device("meta"):
        none = create_model("se_resnet20", stages=[])
        plain = create_model("resnet20")
    assert sum(p.numel() for p in none.parameters()) == sum(p.numel() for p in plain.parameters())
    with pytest.raises(SetrainError, match=r"stages=\[5\].*\[2, 3, 4\]"):
        create_model("se_resnet20", stages=[5])


def test_unknown_placement_lists_the_choices():
    with pytest.raises(SetrainError, match="placement='after'.*standard, pre, post, identity"):
        create_model("se_resnet20", placement="after")
