import pytest
import timm
import torch
import torchvision

from setrain.errors import SetrainError
from setrain.models import create_model, list_models
from setrain.models.resnet import BasicBlock

DEPTHS = [18, 34, 50, 101, 152]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_count(build) -> int:
    """Parameter count without allocating or initialising the weights."""
    with torch.device("meta"):
        return count_parameters(build())


@pytest.mark.parametrize("depth", DEPTHS)
def test_plain_twins_equal_torchvision_resnets(depth):
    ours = meta_count(lambda: create_model(f"resnet{depth}", num_classes=1000))
    reference = meta_count(lambda: getattr(torchvision.models, f"resnet{depth}")())
    assert ours == reference


@pytest.mark.parametrize("depth", DEPTHS)
def test_se_resnets_equal_the_released_senet_models(depth):
    """timm's legacy_seresnet* are the paper authors' models (hidden width exactly C//r)."""
    ours = meta_count(lambda: create_model(f"se_resnet{depth}", num_classes=1000))
    reference = meta_count(lambda: timm.create_model(f"legacy_seresnet{depth}"))
    assert ours == reference


def test_headline_counts_of_the_paper():
    assert meta_count(lambda: create_model("se_resnet50", num_classes=1000)) == 28_088_024
    assert meta_count(lambda: create_model("resnet50", num_classes=1000)) == 25_557_032


@pytest.mark.parametrize(
    "reduction, millions", [(2, 45.7), (4, 35.7), (8, 30.7), (16, 28.1), (32, 26.6)]
)
def test_reduction_ratio_table_of_the_paper(reduction, millions):
    """Paper Table 10 (SE-ResNet-50 on ImageNet); its r=32 entry is rounded down by ~0.2M."""
    count = meta_count(lambda: create_model("se_resnet50", num_classes=1000, reduction=reduction))
    assert count / 1e6 == pytest.approx(millions, abs=0.25)


def test_registry_lists_every_se_model_with_its_plain_twin():
    se_models = list_models("se_*")
    assert {"se_resnet18", "se_resnet50", "se_resnet152", "se_resnet20"} <= set(se_models)
    for name in se_models:
        assert name.removeprefix("se_") in list_models()


def test_unknown_model_lists_the_choices():
    with pytest.raises(SetrainError, match="Unknown model 'se_resnet51'.*se_resnet50"):
        create_model("se_resnet51")


def test_plain_twin_refuses_se_options():
    with pytest.raises(SetrainError, match="does not take.*reduction"):
        create_model("resnet50", reduction=8)


def test_reduction_too_large_for_the_cifar_model_is_a_clear_error():
    with pytest.raises(SetrainError, match="layer of 16 channels"):
        create_model("se_resnet20", reduction=32)


def test_se_sits_on_the_residual_branch_before_the_addition():
    """With the gate forced to 0 the block reduces to relu(shortcut(x)) (paper Fig. 3)."""
    torch.manual_seed(0)
    block = BasicBlock(8, 16, stride=2, se=dict(reduction=4)).eval()
    torch.nn.init.constant_(block.se.excitation[2].bias, -1e4)
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))


@pytest.mark.parametrize("name, size", [("se_resnet20", 32), ("resnet20", 32), ("se_resnet18", 64)])
def test_forward_and_backward_on_a_small_input(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
