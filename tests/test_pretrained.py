"""Weight import: each reference model is built here with random weights (nothing is downloaded),
saved with torch.save, imported, and must then compute the same outputs as the reference."""

import copy
import logging
from functools import partial

import pytest
import timm
import torch
import torchvision
from timm.models import resnet as timm_resnet
from timm.models import senet as timm_senet

from conftest import TINY, assert_user_error, compose_config, run_cli, tiered
from setrain.errors import SetrainError
from setrain.models import build_model, create_model
from setrain.models.pretrained import convert_state_dict, detect_layout, load_pretrained
from setrain.models.resnet import _SENET154, Bottleneck, ResNet

INPUT = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with random BN statistics and affine weights, so BN is not the identity."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.2, generator=generator)
    return model.eval()


def saved(reference: torch.nn.Module, tmp_path) -> str:
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    return str(path)


def imported(name: str, path: str, model=None) -> torch.nn.Module:
    """`model` (by default `create_model(name)`) with the weights of `path`, in eval mode."""
    model = model if model is not None else create_model(name)
    load_pretrained(model, name, path)
    return model.eval()


@torch.no_grad()
def assert_same_outputs(reference, model) -> None:
    torch.testing.assert_close(model(INPUT), reference(INPUT), rtol=1e-4, atol=1e-4)


def senet154_layout(reference: str):
    """SENet-154's stem, 64x4d blocks with a halved first 1x1 and 3x3 projection shortcuts, with
    one block per stage: the layout of the 115M-parameter network at a tenth of its cost."""
    if reference == "ours":
        return ResNet(Bottleneck, [1, 1, 1, 1], se={}, **_SENET154)
    if reference == "timm":
        return timm_resnet.ResNet(
            timm_resnet.Bottleneck, [1, 1, 1, 1], cardinality=64, base_width=4, stem_type="deep",
            down_kernel_size=3, block_reduce_first=2, block_args=dict(attn_layer="se"),
        )  # fmt: skip
    return timm_senet.SENet(  # Cadene's SENet-154 = timm's legacy_senet154
        timm_senet.SEBottleneck, [1, 1, 1, 1], groups=64, reduction=16, inplanes=128,
        input_3x3=True, downsample_kernel_size=3, downsample_padding=1,
    )  # fmt: skip


TV, TIMM = torchvision.models, timm.create_model
# case: (reference builder, our model name, our builder if not create_model(name))
EQUAL_OUTPUT_CASES = {
    # torchvision -> plain twins
    "torchvision resnet18": (TV.resnet18, "resnet18"),
    "torchvision resnet50": (TV.resnet50, "resnet50"),
    "torchvision resnext50_32x4d": (TV.resnext50_32x4d, "resnext50_32x4d"),
    # timm's modern ResNets: SE as 1x1 convs, a deep stem for SENet-154
    "timm seresnet50": (lambda: TIMM("seresnet50"), "se_resnet50"),
    "timm seresnext50_32x4d": (lambda: TIMM("seresnext50_32x4d"), "se_resnext50_32x4d"),
    "timm senet154 layout": (partial(senet154_layout, "timm"), "senet154", partial(senet154_layout, "ours")),
    # Cadene = timm legacy_*, the ones that need no other layout than the stem pool's
    "cadene legacy_senet154 layout": (
        partial(senet154_layout, "cadene"), "senet154", partial(senet154_layout, "ours")
    ),
}


# 50-layer twins of fast cases (resnet18 through the same import, seresnext50 for timm's SE),
# and torchvision's files load as they are (test_models): end-to-end suite only.
SLOW_EQUAL_OUTPUT_CASES = {"torchvision resnet50", "torchvision resnext50_32x4d", "timm seresnet50"}


@pytest.mark.parametrize("case", tiered(EQUAL_OUTPUT_CASES, slow=SLOW_EQUAL_OUTPUT_CASES))
def test_imported_weights_give_the_reference_outputs(case, tmp_path):
    build_reference, name, *build_ours = EQUAL_OUTPUT_CASES[case]
    reference = randomised(build_reference())
    model = build_ours[0]() if build_ours else None
    assert_same_outputs(reference, imported(name, saved(reference, tmp_path), model))


def blocks(model):
    return [block for stage in model.stages() for block in stage]


def padded_stem_pool(model):
    model.maxpool = torch.nn.MaxPool2d(3, stride=2, padding=1)


def stride_on_the_3x3(model):
    for block in blocks(model):
        block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride


def no_relu_before_se(model):
    for block in blocks(model):
        block.se._forward_pre_hooks.clear()


# Cadene's file -> our model, and the undoing of each adaptation to its layout
CADENE_CASES = {
    "legacy_seresnet50": ("se_resnet50", [padded_stem_pool, stride_on_the_3x3]),
    "legacy_seresnext50_32x4d": ("se_resnext50_32x4d", [padded_stem_pool]),
    "legacy_seresnet18": ("se_resnet18", [padded_stem_pool, no_relu_before_se]),
}
SLOW_CADENE_CASES = {"legacy_seresnext50_32x4d"}  # its one undoing is also the other cases'


@pytest.mark.parametrize("case", tiered(CADENE_CASES, slow=SLOW_CADENE_CASES))
def test_cadene_files_give_the_reference_outputs_in_their_layout_only(case, tmp_path):
    name, undoings = CADENE_CASES[case]
    reference = randomised(TIMM(case))
    model = imported(name, saved(reference, tmp_path))
    assert_same_outputs(reference, model)
    for undo in undoings:
        undone = copy.deepcopy(model)
        undo(undone)
        with pytest.raises(AssertionError, match="Tensor-likes are not close"):
            assert_same_outputs(reference, undone)


def test_original_cadene_files_load(tmp_path):
    """Cadene's files predate PyTorch 0.4: legacy serialisation, no BN `num_batches_tracked`."""
    reference = randomised(TIMM("legacy_seresnet18"))
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "se_resnet18.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_same_outputs(reference, imported("se_resnet18", str(path)))


@pytest.mark.parametrize(
    "reference, name",
    [
        pytest.param(lambda: TIMM("senet154"), "senet154", marks=pytest.mark.slow),  # its layout: above
        (lambda: TIMM("legacy_senet154"), "senet154"),
        pytest.param(lambda: TIMM("seresnext101_32x4d"), "se_resnext101_32x4d", marks=pytest.mark.slow),
        pytest.param(lambda: TIMM("legacy_seresnext101_32x4d"), "se_resnext101_32x4d", marks=pytest.mark.slow),
        pytest.param(lambda: TIMM("legacy_seresnet152"), "se_resnet152", marks=pytest.mark.slow),
        pytest.param(TV.resnet152, "resnet152", marks=pytest.mark.slow),
    ],
)
def test_large_models_map_key_for_key_and_shape_for_shape(reference, name):
    """The networks too slow to run here: every tensor of the file lands on one of ours, same shape."""
    with torch.device("meta"):
        state, expected = reference().state_dict(), create_model(name).state_dict()
    converted = convert_state_dict(state, detect_layout(state))
    assert {key: tuple(value.shape) for key, (_, value) in converted.items()} == {
        key: tuple(value.shape) for key, value in expected.items()
    }


def test_plain_weights_into_an_se_model_leave_se_at_init(tmp_path, caplog):
    reference = randomised(TV.resnet18())
    model = create_model("se_resnet18")
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="setrain.models.pretrained"):
        imported("se_resnet18", saved(reference, tmp_path), model)
    assert "left at their init: SE layers (32 tensors)" in caplog.text
    converted = convert_state_dict(reference.state_dict(), "torchvision")
    for key, value in model.state_dict().items():
        source = initial[key] if ".excitation." in key else converted[key][1]
        torch.testing.assert_close(value, source, rtol=0, atol=0, msg=key)


def test_another_number_of_classes_replaces_the_classifier(tmp_path, caplog):
    reference = randomised(TV.resnet18())
    model = create_model("resnet18", num_classes=10)
    fresh_fc = model.fc.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="setrain.models.pretrained"):
        imported("resnet18", saved(reference, tmp_path), model)
    assert "classifier fc (1000 classes in the file, 10 here)" in caplog.text
    torch.testing.assert_close(model.fc.weight, fresh_fc, rtol=0, atol=0)
    features = torch.nn.Sequential(*list(reference.children())[:-2])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(INPUT), features(INPUT))


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module. prefix (DDP)"])
def test_wrapped_state_dicts_and_setrain_checkpoints_load(wrap, tmp_path):
    reference = randomised(create_model("resnet20"))
    state = reference.state_dict()
    content = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}, "epoch": 3},  # a setrain checkpoint
        "module. prefix (DDP)": {f"module.{key}": value for key, value in state.items()},
    }[wrap]
    torch.save(content, tmp_path / "weights.pt")
    assert_same_outputs(reference, imported("resnet20", str(tmp_path / "weights.pt")))


def write(tmp_path, content) -> str:
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"weights file .* does not exist; set model.pretrained to a local"),
        (b"not a torch file", r"cannot be read \(.*\): it is truncated, corrupt"),
        (torch.nn.Linear(2, 2), r"holds pickled Python objects.*torch.save\(model.state_dict\(\), path\)"),
        ({"epoch": 3, "lr": 0.1}, r"are not a state dict"),
        ({"encoder.weight": torch.zeros(1)}, r"keys \(encoder.weight, ...\) are not those of a torchvision"),
    ],
    ids=["missing", "corrupt", "pickled module", "no tensors", "unknown keys"],
)
def test_bad_files_are_one_clear_sentence(content, message, tmp_path):
    path = str(tmp_path / "absent.pt") if content is None else write(tmp_path, content)
    with pytest.raises(SetrainError, match=message):
        load_pretrained(create_model("resnet20"), "resnet20", path)


@pytest.mark.slow  # a ResNeXt-50 32x8d to build and save; the fast tier names misfits with timm's SE widths
def test_torchvision_resnext_of_another_width_names_the_shapes(tmp_path):
    """torchvision's ResNeXts are 32x8d and 64x4d; ours 32x4d. A 32x8d ResNeXt-50 stands in."""
    reference = TV.ResNet(TV.resnet.Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=8)
    shapes = r"shape file vs model: layer1.0.conv1.weight \(256, 64, 1, 1\) vs \(128, 64, 1, 1\)"
    with pytest.raises(SetrainError, match=shapes):
        imported("resnext50_32x4d", saved(reference, tmp_path))


def test_timm_se_widths_rounded_to_eight_are_refused_with_the_reason(tmp_path):
    shapes = r"layer1.0.se.fc1.weight \(8, 64\) vs \(4, 64\).*SE widths differ.*multiple of 8"
    with pytest.raises(SetrainError, match=shapes):
        imported("se_resnet18", saved(TIMM("seresnet18"), tmp_path))


def test_se_weights_into_a_plain_twin_are_refused(tmp_path):
    with pytest.raises(SetrainError, match=r"do not fit model resnet18 \(unexpected: layer1.0.se_module"):
        imported("resnet18", saved(TIMM("legacy_seresnet18"), tmp_path))


def test_format_that_contradicts_the_keys_is_refused(tmp_path):
    path = saved(create_model("se_resnet20"), tmp_path)
    with pytest.raises(SetrainError, match="have setrain keys, not cadene ones"):
        load_pretrained(create_model("se_resnet20"), "se_resnet20", path, file_format="cadene")
    with pytest.raises(SetrainError, match="have setrain keys, not torchvision ones"):
        load_pretrained(create_model("se_resnet20"), "se_resnet20", path, file_format="torchvision")
    plain = saved(create_model("resnet20"), tmp_path)  # a plain setrain ResNet has torchvision's keys
    load_pretrained(create_model("resnet20"), "resnet20", plain, file_format="setrain")
    with pytest.raises(SetrainError, match="pretrained_format='caffe' is not known"):
        load_pretrained(create_model("resnet20"), "resnet20", path, file_format="caffe")


def test_model_config_imports_and_keeps_its_own_keys(tmp_path):
    cfg = compose_config("model=se_resnet50", "model.pretrained=/x.pt", "model.pretrained_format=timm")
    assert cfg.model.pretrained == "/x.pt" and cfg.model.pretrained_format == "timm"
    assert cfg.model.se.reduction == 16 and cfg.model.name == "se_resnet50"
    assert compose_config().model.pretrained is None

    reference = randomised(create_model("resnet20"))
    model_cfg = {"name": "resnet20", "pretrained": saved(reference, tmp_path), "pretrained_format": "auto"}
    assert_same_outputs(reference, build_model(model_cfg, num_classes=10).eval())


@pytest.mark.slow
def test_cli_trains_from_imported_weights(tmp_path):
    """With a learning rate of 1e-9 the trained conv weights are still the file's, so they were loaded
    (setrain refuses lr=0)."""
    weights = randomised(create_model("resnet20", num_classes=10)).state_dict()
    torch.save(weights, tmp_path / "resnet20.pt")
    run_dir = tmp_path / "run"
    common = (*TINY, "trainer.epochs=1", "model=resnet20")
    result = run_cli(*common, "optimizer.lr=1e-9", "model.pretrained=resnet20.pt", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Imported 128 tensors from resnet20.pt (torchvision/timm layout) into resnet20" in result.stdout
    trained = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["model"]
    torch.testing.assert_close(trained["conv1.weight"], weights["conv1.weight"])

    (tmp_path / "broken.pt").write_bytes(b"truncated")
    result = run_cli(*common, "model.pretrained=broken.pt", f"hydra.run.dir={tmp_path / 'broken'}", cwd=tmp_path)
    assert_user_error(result, "setrain: error: The pretrained weights file broken.pt cannot be read")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
