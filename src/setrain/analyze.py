"""What SE learns (paper Sec. 7): the excitations per class at each depth, and SE removed by stage.

    python -m setrain.analyze checkpoint=outputs/<run>/checkpoints/best.pt data=stl10 classes=[0,3,7]

writes into <run dir>/analysis/ (configs/analyze.yaml lists the options):

- `excitations.npz`: per SE block, the mean gate per channel over all images (`<block>/mean`, C),
  per chosen class (`<block>/class_means`, K x C) and the images per class (`class_counts`, K);
- `fig6_excitations.png`: the paper's Fig. 6, one panel per SE block, channels on x, a line per class;
- `class_specificity.png`: how far the per-class means spread, against depth;
- `se_ablation.md`: val top-1 with the gates of one stage forced to 1 (TPAMI Table 15 in spirit);
- `analysis.json` (all the numbers) and `tb/` (the figures and the table, for TensorBoard).

Forward hooks on each SE block's `excitation` read or replace its gate; no model code changes.
"""

import json
import logging
import sys
from contextlib import contextmanager
from itertools import islice

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from setrain.cli import run, run_command
from setrain.engine.loop import evaluate, topk_correct
from setrain.engine.runtime import resolve_device
from setrain.errors import SetrainError
from setrain.figures import pyplot
from setrain.files import write_output
from setrain.models.se import SEBlock, se_blocks, stage_of
from setrain.trained import load_trained_model, trained_data

log = logging.getLogger(__name__)

DEFAULT_CLASSES = 10  # lines per panel when `classes` is not given; more are unreadable
MAX_PANELS = 12  # deeper networks show this many SE blocks, evenly spaced by depth


@torch.inference_mode()
def collect_excitations(
    model: nn.Module, batches, num_classes: int, device: torch.device
) -> tuple[dict[str, Tensor], Tensor, float]:
    """Sum every SE block's gate (N, C) per class over `batches`, in eval mode.

    Returns the sums per block (num_classes, C), the images per class (num_classes,) and the
    intact model's top-1 on these batches, so the ablation need not run it again; only the sums
    are kept, never the activations. float64, so means over many images stay exact.
    """
    model.eval()
    blocks = se_blocks(model)
    sums = {
        name: torch.zeros(num_classes, block.excitation[0].in_features, dtype=torch.float64, device=device)
        for name, block in blocks.items()
    }
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)

    def recorder(name: str):
        def record(module, inputs, gate):  # returns None: the gate passes on unchanged
            sums[name].index_add_(0, labels, gate.double())

        return record

    handles = [block.excitation.register_forward_hook(recorder(name)) for name, block in blocks.items()]
    try:
        for images, targets in batches:
            labels = targets.to(device)  # read by the hooks during the forward below
            (hits,) = topk_correct(model(images.to(device)), labels, ks=(1,))
            correct += hits
            counts += torch.bincount(labels, minlength=num_classes)
    finally:
        for handle in handles:
            handle.remove()
    return sums, counts, 100 * correct.item() / counts.sum().item()


def summarise(sums: dict[str, Tensor], counts: Tensor, classes: list[int]) -> dict[str, dict]:
    """Per block: the mean gate over all images (C,), per chosen class (K, C), and the class
    specificity, the spread (std) of the per-class means over the chosen classes, averaged over
    channels: near 0 where all classes are excited alike (early layers in the paper's Fig. 6)."""
    empty = [label for label in classes if counts[label] == 0]
    if empty:
        raise SetrainError(
            f"Class(es) {empty} have no images in the analysed validation batches; raise `batches` "
            "(or set batches=null for all) or pick other classes."
        )
    summary = {}
    for name, per_class in sums.items():
        class_means = per_class[classes] / counts[classes][:, None]
        summary[name] = {
            "mean": (per_class.sum(0) / counts.sum()).cpu().numpy(),
            "class_means": class_means.cpu().numpy(),
            "specificity": class_means.std(dim=0, correction=0).mean().item() if len(classes) > 1 else 0.0,
        }
    return summary


@contextmanager
def se_disabled(blocks: list[SEBlock]):
    """Force the gates of `blocks` to 1 while the context lasts: their input passes unscaled."""
    handles = [
        block.excitation.register_forward_hook(lambda module, inputs, gate: torch.ones_like(gate))
        for block in blocks
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def se_ablation(
    model: nn.Module, loader, limit: int | None, device: torch.device, intact: float
) -> list[dict]:
    """Val top-1 with the gates of each stage, then of all stages, forced to 1: SE switched off
    there without retraining. `change` is in percentage points against `intact`, the top-1 of
    the intact model on the same batches."""
    blocks = se_blocks(model)
    groups: dict[str, list[SEBlock]] = {}
    for name, block in blocks.items():
        groups.setdefault(stage_of(name), []).append(block)
    groups["all"] = list(blocks.values())
    criterion = nn.CrossEntropyLoss()
    rows = [{"se_disabled_in": "none", "top1": intact, "change": 0.0}]
    for group, members in groups.items():
        with se_disabled(members):
            top1 = evaluate(model, criterion, islice(loader, limit), device, f"SE off in {group}")["top1"]
        rows.append({"se_disabled_in": group, "top1": top1, "change": top1 - intact})
    return rows


def plot_excitations(plt, summary: dict[str, dict], classes: list[int], title: str):
    """Fig. 6 of the paper: per SE block, the mean gate of each channel per class and overall."""
    names = list(summary)
    if len(names) > MAX_PANELS:
        picked = np.unique(np.linspace(0, len(names) - 1, MAX_PANELS).round().astype(int))
        shown = [names[i] for i in picked]
        which = f"{len(shown)} of {len(names)} SE blocks, evenly spaced by depth"
    else:
        shown, which = names, f"all {len(names)} SE blocks"
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, shown):
        for label, means in zip(classes, summary[name]["class_means"]):
            ax.plot(means, linewidth=0.8, label=f"class {label}")
        ax.plot(summary[name]["mean"], color="black", linestyle="--", linewidth=1, label="all images")
        ax.set_title(name)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("channel index")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean excitation")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle(f"{title}: mean excitation per channel ({which})", fontsize="x-large")
    fig.tight_layout(rect=(0, 0.1 / rows, 1, 1 - 0.06 / rows))
    return fig


def plot_specificity(plt, summary: dict[str, dict], title: str):
    """The class specificity of each SE block against its depth."""
    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.5 * len(names) + 2), 4.2))
    ax.plot(range(len(names)), [summary[name]["specificity"] for name in names], "o-", markersize=6)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_xlabel("SE block, from input to output")
    ax.set_ylabel("spread over classes\n(std of the mean excitation)")
    ax.set_title(f"{title}: class specificity by depth")
    fig.tight_layout()
    return fig


def ablation_table(rows: list[dict]) -> str:
    lines = ["| SE disabled in | val top-1 (%) | change (points) |", "|---|---|---|"]
    lines += [f"| {row['se_disabled_in']} | {row['top1']:.2f} | {row['change']:+.2f} |" for row in rows]
    return "\n".join(lines) + "\n"


def analyze(cfg: DictConfig) -> dict:
    """Run the analysis of `cfg` (configs/analyze.yaml); returns what analysis.json holds."""
    plt = pyplot("setrain.analyze")
    trained = load_trained_model(cfg, "analyze")
    model, num_classes = trained.model, trained.num_classes
    if not se_blocks(model):
        raise SetrainError(f"{trained.name} is a plain network; analyze an SE model.")

    if cfg.classes is None:
        classes = list(range(min(num_classes, DEFAULT_CLASSES)))
    else:
        classes = list(cfg.classes) if OmegaConf.is_list(cfg.classes) else [cfg.classes]
    if not classes or any(not isinstance(c, int) or not 0 <= c < num_classes for c in classes):
        raise SetrainError(
            f"classes={classes} must list class ids from 0 to {num_classes - 1} (this model has "
            f"{num_classes} classes), e.g. classes=[0,3,7]."
        )
    if cfg.batches is not None and cfg.batches < 1:
        raise SetrainError(f"batches={cfg.batches} must be at least 1, or null for all validation batches.")

    device = resolve_device(cfg.device)
    data, data_cfg = trained_data(trained, cfg.get("data"), device)
    model.to(device)

    out_dir = trained.output_dir(cfg.output_dir, "analysis")
    log.info(
        "Analysing %s (epoch %d, %s weights) on %s into %s",
        trained.checkpoint, trained.epoch, trained.weights, data_cfg.name, out_dir,
    )  # fmt: skip
    batches = islice(data.val_loader, cfg.batches)
    sums, counts, intact_top1 = collect_excitations(model, batches, num_classes, device)
    summary = summarise(sums, counts, classes)
    ablation = se_ablation(model, data.val_loader, cfg.batches, device, intact_top1)

    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"classes": np.array(classes), "class_counts": counts[classes].cpu().numpy()}
    for name, block in summary.items():
        arrays[f"{name}/mean"], arrays[f"{name}/class_means"] = block["mean"], block["class_means"]
    write_output(out_dir / "excitations.npz", lambda file: np.savez(file, **arrays))

    title = f"{trained.name} on {data_cfg.name}"
    figures = {
        "fig6_excitations": plot_excitations(plt, summary, classes, title),
        "class_specificity": plot_specificity(plt, summary, title),
    }
    writer = SummaryWriter(out_dir / "tb")
    for name, fig in figures.items():
        write_output(out_dir / f"{name}.png", lambda file, fig=fig: fig.savefig(file, format="png"))
        writer.add_figure(f"analysis/{name}", fig)  # closes the figure
    table = ablation_table(ablation)
    write_output(
        out_dir / "se_ablation.md",
        f"# {title}: val top-1 with SE disabled (gates forced to 1), from {trained.checkpoint}\n\n{table}",
    )
    writer.add_text("analysis/se_ablation", table)
    for depth, (name, block) in enumerate(summary.items()):
        writer.add_scalar("analysis/class_specificity", block["specificity"], depth)
    writer.close()

    results = {
        **trained.provenance,
        "data": data_cfg.name,
        "classes": classes,
        "images": int(counts.sum().item()),
        "class_specificity": {name: block["specificity"] for name, block in summary.items()},
        "se_ablation": ablation,
    }
    write_output(out_dir / "analysis.json", json.dumps(results, indent=2) + "\n")
    log.info("SE disabled by stage, val top-1 on %d images:\n%s", results["images"], table)
    log.info("Done: figures, excitations.npz, se_ablation.md and tb/ in %s", out_dir)
    return results


@hydra.main(version_base="1.3", config_path="../../configs", config_name="analyze")
def main(cfg: DictConfig) -> None:
    run_command(analyze, cfg)


if __name__ == "__main__":
    sys.exit(run(main))
