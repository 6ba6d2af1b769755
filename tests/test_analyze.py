"""`python -m setrain.analyze`: excitations per class and SE removed by stage (paper Sec. 7)."""

import copy
import json
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_user_error, compose_config, run_module
from setrain.analyze import (
    analyze, collect_excitations, se_ablation, se_disabled, summarise,
)
from setrain.engine.loop import evaluate
from setrain.errors import SetrainError
from setrain.figures import pyplot
from setrain.models import SEBlock, create_model
from setrain.models.se import se_blocks, stage_of


def run_analyze(*args: str, cwd):
    return run_module("setrain.analyze", *args, cwd=cwd)


def analyze_config(*overrides: str):
    return compose_config(*overrides, config_name="analyze")


def tiny_batches(num_classes=4, sizes=(8, 8, 5)):
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(n, 3, 16, 16, generator=generator) for n in sizes]
    return [(batch, torch.randint(num_classes, (len(batch),), generator=generator)) for batch in images]


def test_collected_class_means_average_to_the_overall_mean_and_match_the_gates():
    torch.manual_seed(0)
    model = create_model("se_resnet20", num_classes=4)
    batches = tiny_batches()
    sums, counts, top1 = collect_excitations(model, batches, 4, torch.device("cpu"))
    blocks = se_blocks(model)
    assert top1 == evaluate(model, nn.CrossEntropyLoss(), batches, torch.device("cpu"), "check")["top1"]
    assert len(sums) == len(blocks) == sum(isinstance(m, SEBlock) for m in model.modules()) == 9
    assert list(blocks)[:4] == ["SE_2_1", "SE_2_2", "SE_2_3", "SE_3_1"]
    assert counts.sum() == 21

    summary = summarise(sums, counts, classes=[0, 1, 2, 3])
    for name, block in summary.items():
        assert block["class_means"].shape == (4, blocks[name].excitation[0].in_features)
        weighted = (counts.numpy()[:, None] * block["class_means"]).sum(0) / counts.sum().item()
        np.testing.assert_allclose(weighted, block["mean"], rtol=1e-12)

    # The last block's gates, computed directly, give the same mean per class.
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    gates = []
    handle = blocks["SE_4_3"].excitation.register_forward_hook(lambda m, i, gate: gates.append(gate))
    with torch.no_grad():
        model(images)
    handle.remove()
    expected = torch.stack([gates[0][labels == k].mean(0) for k in range(4)]).double()
    np.testing.assert_allclose(summary["SE_4_3"]["class_means"], expected.numpy(), rtol=1e-5)


def test_ablation_names_paper_stages_and_leaves_the_model_intact():
    torch.manual_seed(0)
    model = create_model("se_resnet20", num_classes=4).eval()
    batches = tiny_batches()
    before = model(batches[0][0])
    _, _, intact = collect_excitations(model, batches, 4, torch.device("cpu"))
    rows = se_ablation(model, batches, None, torch.device("cpu"), intact)
    assert rows[0] == {"se_disabled_in": "none", "top1": intact, "change": 0.0}
    assert [row["se_disabled_in"] for row in rows] == ["none", "stage 2", "stage 3", "stage 4", "all"]
    assert all(row["change"] == pytest.approx(row["top1"] - rows[0]["top1"]) for row in rows)
    torch.testing.assert_close(model(batches[0][0]), before)  # the hooks are gone


def test_gates_forced_to_one_compute_the_network_without_se():
    torch.manual_seed(0)
    model = create_model("se_resnet20", num_classes=4).eval()
    images = tiny_batches()[0][0]
    without_se = copy.deepcopy(model)
    for module in without_se.modules():
        if isinstance(getattr(module, "se", None), SEBlock):
            module.se = nn.Identity()
    with torch.no_grad(), se_disabled(list(se_blocks(model).values())):
        torch.testing.assert_close(model(images), without_se(images))


def test_blocks_outside_stages_are_their_own_depth():
    blocks = se_blocks(create_model("se_mobilenet_v1", num_classes=4, width_mult=0.25))
    assert list(blocks) == [f"SE_{n}" for n in range(1, 14)]
    assert stage_of("SE_5") == "SE_5" and stage_of("SE_3_2") == "stage 3"


def test_analyze_without_a_checkpoint_says_which_to_pass():
    with pytest.raises(SetrainError, match=r"No checkpoint given; pass checkpoint=<run dir>/checkpoints/best.pt"):
        analyze(analyze_config())


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SetrainError, match=r"pip install 'setrain\[analysis\]'"):
        pyplot("setrain.analyze")


@pytest.mark.slow
def test_analyze_cli_writes_consistent_figures_arrays_and_ablation(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.pt"
    result = run_analyze(f"checkpoint={checkpoint}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing lands in the working directory
    out = trained_run / "analysis"
    for name in ("fig6_excitations.png", "class_specificity.png", "se_ablation.md", "analysis.json"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tb").glob("events.out.tfevents.*"))

    every = np.load(out / "excitations.npz")
    assert list(every["classes"]) == list(range(10))
    counts = every["class_counts"]
    assert counts.sum() == 32  # data.val_size of TINY
    names = sorted(key.split("/")[0] for key in every.files if key.endswith("/mean"))
    assert names == sorted(f"SE_{stage}_{block}" for stage in (2, 3, 4) for block in (1, 2, 3))
    for name in names:
        class_means = every[f"{name}/class_means"]
        assert class_means.shape == (10, every[f"{name}/mean"].shape[0])
        present = counts > 0
        weighted = (counts[present, None] * class_means[present]).sum(0) / counts.sum()
        np.testing.assert_allclose(weighted, every[f"{name}/mean"], rtol=1e-10)

    report = json.loads((out / "analysis.json").read_text())
    stages = [row["se_disabled_in"] for row in report["se_ablation"]]
    assert stages == ["none", "stage 2", "stage 3", "stage 4", "all"]
    assert report["se_ablation"][0]["top1"] == pytest.approx(
        json.loads((trained_run / "results.json").read_text())["final"]["val_top1"]
    )
    assert "| stage 4 |" in (out / "se_ablation.md").read_text()
    assert list(report["class_specificity"]) == [f"SE_{s}_{b}" for s in (2, 3, 4) for b in (1, 2, 3)]
    assert all(score >= 0 for score in report["class_specificity"].values())

    chosen_dir = tmp_path / "chosen"
    chosen = run_analyze(
        f"checkpoint={checkpoint}", "classes=[0,3,7]", f"output_dir={chosen_dir}", cwd=tmp_path
    )
    assert chosen.returncode == 0, chosen.stderr
    subset = np.load(chosen_dir / "excitations.npz")
    for name in names:
        assert subset[f"{name}/class_means"].shape[0] == 3
        np.testing.assert_allclose(subset[f"{name}/class_means"], every[f"{name}/class_means"][[0, 3, 7]])
        np.testing.assert_allclose(subset[f"{name}/mean"], every[f"{name}/mean"])


@pytest.mark.slow
def test_analyze_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_analyze(f"checkpoint={tmp_path / 'nope.pt'}", cwd=tmp_path)
    assert_user_error(result, "setrain: error: Checkpoint", "does not exist; pass checkpoint=")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


def _rewritten_checkpoint(trained_run, tmp_path, model_name, num_classes):
    """The trained run's checkpoint with another model's weights in it."""
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    state["model"] = create_model(model_name, num_classes=num_classes).state_dict()
    state["config"]["model"] = {"name": model_name}
    path = tmp_path / "checkpoints" / "other.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, num_classes, override, message",
    [
        ("resnet20", 10, None, "resnet20 is a plain network; analyze an SE model."),
        ("se_resnet20", 5, None, "has 10 classes but the checkpoint's classifier has 5"),
        ("se_resnet20", 10, "classes=[0,10]", "must list class ids from 0 to 9"),
        ("se_resnet20", 10, "classes=bird", "classes=['bird'] must list class ids from 0 to 9"),
        ("se_resnet20", 10, "+data.val_size=0", "validation set is empty"),
    ],
)
def test_analyze_user_errors(trained_run, tmp_path, model_name, num_classes, override, message):
    checkpoint = _rewritten_checkpoint(trained_run, tmp_path, model_name, num_classes)
    cfg = analyze_config(f"checkpoint={checkpoint}", "device=cpu", *([override] if override else []))
    with pytest.raises(SetrainError, match=re.escape(message)):
        analyze(cfg)
