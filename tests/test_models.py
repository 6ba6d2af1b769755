import inspect
import json

import pytest
import timm
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO_ROOT, tiered
from setrain.errors import SetrainError
from setrain.models import SEBlock, build_model, create_model, is_se_model, list_models, plain_twin, registry
from setrain.models.registry import SE_TWINS
from setrain.engine.checkpoint import load_checkpoint
from setrain.models.resnet import BasicBlock, renamed_from_sequential_layout

DEPTHS = [18, 34, 50, 101, 152]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_count(build) -> int:
    """Parameter count without allocating or initialising the weights."""
    with torch.device("meta"):
        return count_parameters(build())


def se_parameters(model: nn.Module) -> int:
    return sum(count_parameters(m) for m in model.modules() if isinstance(m, SEBlock))


# Reference implementations with the same architecture, built with random weights.
REFERENCES = {
    **{f"resnet{d}": lambda d=d: getattr(torchvision.models, f"resnet{d}")() for d in DEPTHS},
    # timm's legacy_* are ports of the paper authors' released models (hidden width exactly C//r).
    **{f"se_resnet{d}": lambda d=d: timm.create_model(f"legacy_seresnet{d}") for d in DEPTHS},
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(),
    "resnext101_32x4d": lambda: timm.create_model("resnext101_32x4d"),
    "se_resnext50_32x4d": lambda: timm.create_model("legacy_seresnext50_32x4d"),
    "se_resnext101_32x4d": lambda: timm.create_model("legacy_seresnext101_32x4d"),
    "senet154": lambda: timm.create_model("legacy_senet154"),
    "mobilenet_v1": lambda: timm.create_model("mobilenetv1_100"),
}


# The deepest networks take seconds each even on the meta device: end-to-end suite only (the
# headline counts below keep SENet-154 in the fast tier).
DEEPEST = {"resnet101", "resnet152", "se_resnet101", "se_resnet152", "resnext101_32x4d", "se_resnext101_32x4d",
           "resnext152_64x4d", "senet154"}  # fmt: skip


@pytest.mark.parametrize("name", tiered(sorted(REFERENCES), slow=DEEPEST))
def test_parameter_count_equals_the_reference_implementation(name):
    assert meta_count(lambda: create_model(name, num_classes=1000)) == meta_count(REFERENCES[name])


def test_headline_counts_of_the_paper():
    """SENet-154 115.1M, SE-ResNeXt-50 27.6M, SE-ResNet-50 28.1M vs ResNet-50 25.6M (Table 2)."""
    assert meta_count(lambda: create_model("senet154")) == 115_088_984
    assert meta_count(lambda: create_model("se_resnext50_32x4d")) == 27_559_896
    assert meta_count(lambda: create_model("se_resnet50")) == 28_088_024
    assert meta_count(lambda: create_model("resnet50")) == 25_557_032


@pytest.mark.parametrize(  # SE-ResNet-56 and -110: SE-ResNet-20's code with more blocks
    "name", tiered([n for n in list_models() if is_se_model(n)], slow=DEEPEST | {"se_resnet56", "se_resnet110"})
)
def test_every_se_model_is_its_plain_twin_plus_the_se_blocks(name):
    """Same code, SE off: removing the SE parameters leaves exactly the twin."""
    with torch.device("meta"):
        se_model, twin = create_model(name), create_model(plain_twin(name))
    assert se_parameters(se_model) > 0 and se_parameters(twin) == 0
    assert count_parameters(se_model) - se_parameters(se_model) == count_parameters(twin)


@pytest.mark.parametrize(
    "depth, millions", [(20, 0.27), (32, 0.46), (56, 0.85), (110, 1.7)]
)
def test_cifar_resnets_have_the_sizes_of_he_et_al(depth, millions):
    """He et al. 2016, Table 6: 6n+2 layers with 16/32/64 channels. Its zero-padding shortcuts
    have no parameters; setrain's two 1x1 projections add 2,752 (1% of ResNet-20)."""
    assert meta_count(lambda: create_model(f"resnet{depth}")) / 1e6 == pytest.approx(millions, rel=0.02)


@pytest.mark.parametrize(
    "reduction, millions", [(2, 45.7), (4, 35.7), (8, 30.7), (16, 28.1), (32, 26.6)]
)
def test_reduction_ratio_table_of_the_paper(reduction, millions):
    """TPAMI Sec. 6.1 (SE-ResNet-50 on ImageNet); its r=32 entry is rounded down by ~0.2M."""
    count = meta_count(lambda: create_model("se_resnet50", num_classes=1000, reduction=reduction))
    assert count / 1e6 == pytest.approx(millions, abs=0.25)


class PytorchCifarSEBlock(nn.Module):
    """The pytorch-cifar SENet block, written as that repository does: SE as two 1x1 convs."""

    def __init__(self, in_planes, planes, stride=1, reduction=16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.fc1 = nn.Conv2d(planes, planes // reduction, 1)
        self.fc2 = nn.Conv2d(planes // reduction, planes, 1)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.avg_pool2d(out, out.size(2))))))
        return torch.relu(out * w + self.shortcut(x))


class PytorchCifarSENet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(PytorchCifarSEBlock(in_planes, planes, stride), PytorchCifarSEBlock(planes, planes)))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(nn.functional.avg_pool2d(out, 4).flatten(1))


def pytorch_cifar_to_setrain_key(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """pytorch-cifar names its stages `layers.<i>`, its shortcut `shortcut` and its classifier
    `linear`; the conv and BN names are torchvision's, as ours."""
    parts = key.split(".")
    if parts[0] == "linear":
        return f"fc.{parts[1]}", value
    if parts[0] != "layers":
        return key, value
    prefix = f"layer{int(parts[1]) + 1}.{parts[2]}"
    module, rest = parts[3], ".".join(parts[4:])
    if module == "shortcut":
        return f"{prefix}.downsample.{rest}", value
    if module in ("fc1", "fc2"):
        linear = {"fc1": "se.excitation.0", "fc2": "se.excitation.2"}[module]
        return f"{prefix}.{linear}.{rest}", value.flatten(1) if value.dim() == 4 else value
    return f"{prefix}.{module}.{rest}", value


def test_senet18_cifar_computes_what_pytorch_cifar_senet18_computes():
    """senet18_cifar is pytorch-cifar's SENet-18: same parameters, and the same outputs once its
    1x1-conv excitation weights are loaded into the FC excitation."""
    torch.manual_seed(0)
    reference = PytorchCifarSENet18().eval()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):  # so BN is not the identity
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    ours = create_model("senet18_cifar").eval()
    assert count_parameters(ours) == count_parameters(reference)
    ours.load_state_dict(dict(pytorch_cifar_to_setrain_key(k, v) for k, v in reference.state_dict().items()))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), reference(x))


def test_every_model_with_se_options_is_paired_with_a_registered_plain_twin():
    """SE_TWINS names every model whose factory takes SE options (`**se`), and each twin exists
    and takes none."""
    def takes_se(name):
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(registry._MODELS[name]).parameters.values())

    assert set(SE_TWINS) == {name for name in list_models() if takes_se(name)}
    assert all(twin in list_models() and not takes_se(twin) for twin in SE_TWINS.values())


def test_unknown_model_lists_the_choices():
    with pytest.raises(SetrainError, match="Unknown model 'se_resnet51'.*se_resnet50"):
        create_model("se_resnet51")


def test_plain_twin_refuses_se_options():
    with pytest.raises(SetrainError, match="does not take.*reduction"):
        create_model("resnet50", reduction=8)


def test_unknown_se_option_names_the_known_ones():
    with pytest.raises(SetrainError, match="Unknown SE option.*ratio.*reduction, squeeze, gate"):
        create_model("se_resnet20", ratio=8)
    with pytest.raises(SetrainError, match="placement.*its SE options are reduction, squeeze, gate"):
        create_model("se_mobilenet_v1", placement="pre")


def test_reduction_too_large_for_the_cifar_model_is_a_clear_error():
    with pytest.raises(SetrainError, match="layer of 16 channels"):
        create_model("se_resnet20", reduction=32)


def test_mobilenet_width_multiplier_scales_the_channels():
    """Howard et al. Table 6 in spirit: alpha=0.5 has about a quarter of the parameters."""
    full = meta_count(lambda: create_model("mobilenet_v1"))
    half = meta_count(lambda: create_model("mobilenet_v1", width_mult=0.5))
    assert create_model("se_mobilenet_v1", num_classes=10, width_mult=0.5).fc.in_features == 512
    assert 0.2 < half / full < 0.4


# One model of each family and block in the fast tier: the SE models under 15M parameters, whose
# forward and backward take well under a second here, and ResNet-20 for the path without SE (each
# SE model's plain twin is the same code, test_every_se_model_is_its_plain_twin_plus_the_se_blocks).
# The others, and a model not listed, run in the end-to-end suite. Listed rather than counted:
# building every model to count, even on the meta device, took 10 s of each collection.
LIGHT = {"se_resnet18", "senet18_cifar", "se_mobilenet_v1", "resnet20", "se_resnet20", "se_resnet32", "se_resnet56"}


@pytest.mark.parametrize("name", tiered(list_models(), slow=set(list_models()) - LIGHT))
def test_forward_and_backward_on_a_small_input(name):
    """With another number of classes and input channels than the defaults, as every model takes."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=1)
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# A basic and a depthwise block fast; the CIFAR SENet-18 and grouped convolutions end to end only.
@pytest.mark.parametrize(
    "name", tiered(["se_resnet20", "se_mobilenet_v1", "senet18_cifar", "se_resnext50_32x4d"], slow={"senet18_cifar", "se_resnext50_32x4d"})
)  # fmt: skip
def test_channels_last_and_bf16_autocast_compute_the_same_function(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    channels_last = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last(x.to(memory_format=torch.channels_last)), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = model(x)
    assert low_precision.dtype == torch.bfloat16
    torch.testing.assert_close(low_precision.float(), expected, atol=0.1, rtol=0.1)


@pytest.mark.slow
def test_models_compile_into_one_graph():
    """No graph breaks under torch.compile (the aot_eager backend needs no C++ compiler)."""
    torch.manual_seed(0)
    model = create_model(
        "se_resnet20", placement="identity", gate="tanh", squeeze="max", stages=[3, 4]
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow  # seconds for the deepest networks, even on the meta device; the small ones run the forward test
@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_num_classes_and_in_chans(name):
    """Checked on the meta device: shapes only."""
    with torch.device("meta"):
        model = create_model(name, num_classes=3, in_chans=1)
        assert model(torch.empty(2, 1, 64, 64)).shape == (2, 3)


def test_every_registered_model_has_its_config_and_every_config_names_its_model():
    """`model=<name>` works for each name list_models() gives, and no config is left over."""
    configs = {path.stem: OmegaConf.load(path).name for path in (REPO_ROOT / "configs" / "model").glob("*.yaml")}
    assert sorted(configs) == list_models()
    assert all(name == stem for stem, name in configs.items())


@pytest.mark.slow
def test_every_model_config_builds_its_model():
    """No config passes an option its factory refuses (built on the meta device: no memory)."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        for name in list_models():
            model_cfg = OmegaConf.to_container(compose("train", overrides=[f"model={name}"]).model, resolve=True)
            with torch.device("meta"):
                build_model(model_cfg, num_classes=10)


def test_the_se_pattern_lists_every_se_model_and_no_plain_one():
    assert set(list_models("se*")) == {name for name in list_models() if is_se_model(name)}
    assert {"senet154", "senet18_cifar", "se_resnet50"} <= set(list_models("se*"))


# Bottleneck blocks take the same names from timm's files too: test_pretrained's fast cases.
@pytest.mark.parametrize("name", tiered(["resnet18", "resnet50", "resnext50_32x4d"], slow={"resnet50", "resnext50_32x4d"}))
def test_torchvision_state_dicts_load_as_they_are(name):
    """The layers carry torchvision's names: its files load with a strict load_state_dict, no renaming."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    model = create_model(name).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x))


# The keys and shapes setrain's ResNets had before their layers took torchvision's names
# (`stem.0`, `stages.1.0.residual.3`, `shortcut`), recorded from that code.
SEQUENTIAL_LAYOUT = json.loads((REPO_ROOT / "tests" / "data" / "sequential_layout_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(SEQUENTIAL_LAYOUT))
def test_state_dicts_of_the_sequential_layout_map_onto_todays_names_in_order(name):
    """One to one and in the same order: the old weights load, and the optimizer state saved beside
    them, which torch indexes by that order, still fits."""
    with torch.device("meta"):
        expected = create_model(name, num_classes=10).state_dict()
    old = {key: torch.empty(shape, device="meta") for key, shape in SEQUENTIAL_LAYOUT[name]}
    renamed = renamed_from_sequential_layout(old)
    assert list(renamed) == list(expected)
    assert [value.shape for value in renamed.values()] == [value.shape for value in expected.values()]


def test_a_checkpoint_of_the_sequential_layout_loads_into_todays_model(tmp_path):
    old = {key: torch.full(shape, float(index)) for index, (key, shape) in enumerate(SEQUENTIAL_LAYOUT["se_resnet20"])}
    torch.save({"model": old, "ema": old, "optimizer": {}, "scheduler": {}, "epoch": 1}, tmp_path / "last.pt")
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    for weights in ("model", "ema"):
        model = create_model("se_resnet20")
        model.load_state_dict(checkpoint[weights])
        torch.testing.assert_close(model.layer2[0].conv2.weight, old["stages.1.0.residual.3.weight"])
        torch.testing.assert_close(model.layer3[0].downsample[1].bias, old["stages.2.0.shortcut.1.bias"])
        torch.testing.assert_close(model.bn1.running_var, old["stem.1.running_var"])
