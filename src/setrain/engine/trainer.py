"""`train(cfg, run_dir)`: the whole run, from config to checkpoints, curves and results.json."""

import json
import logging
import os
import random
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.tensorboard import SummaryWriter

from setrain.data import build_data
from setrain.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from setrain.engine.loop import evaluate, train_one_epoch
from setrain.errors import SetrainError
from setrain.models import build_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` picks the GPU when there is one; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SetrainError(
                f"trainer.device={name} but PyTorch sees no CUDA GPU; use trainer.device=auto or cpu."
            )
        return torch.device(name)
    raise SetrainError(f"trainer.device={name!r} is not supported; use auto, cpu or cuda.")


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _instantiate(group: str, node: DictConfig, **kwargs):
    """Build an optimizer or scheduler with torch's own class named by `_target_` in the config."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise SetrainError(
            f"Could not build the {group} {node.get('_target_')} from configs/{group}/: {cause}; "
            f"fix the {group}.* values."
        ) from error


def _resume_path(resume: str | None, checkpoint_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.pt"
        if last.is_file():
            return last
        log.info("resume=auto: no %s yet, starting from scratch", last)
        return None
    return Path(resume)


def _write_json(data: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train `cfg.model` on `cfg.data`, writing checkpoints/, tb/ and results.json into `run_dir`."""
    started = time.perf_counter()
    if cfg.trainer.epochs < 1:
        raise SetrainError(f"trainer.epochs={cfg.trainer.epochs} must be at least 1.")
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    data = build_data(cfg.data, device)
    model = build_model(OmegaConf.to_container(cfg.model), data.num_classes).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    criterion = nn.CrossEntropyLoss()
    optimizer = _instantiate("optimizer", cfg.optimizer, params=model.parameters())
    scheduler = _instantiate("scheduler", cfg.scheduler, optimizer=optimizer)

    checkpoint_dir = run_dir / "checkpoints"
    first_epoch, best, last_metrics = 1, {"epoch": 0, "val_top1": -1.0}, {}
    resume_from = _resume_path(cfg.resume, checkpoint_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        load_model_state(model, state["model"], resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
        first_epoch, best, last_metrics = state["epoch"] + 1, state["best"], state["metrics"]
        log.info("Resumed from %s after epoch %d", resume_from, state["epoch"])

    log.info(
        "Training %s (%s parameters) on %s for %d epochs on %s; run dir %s",
        cfg.model.name, f"{num_params:,}", cfg.data.name, cfg.trainer.epochs, device, run_dir,
    )  # fmt: skip
    resolved_config = OmegaConf.to_container(cfg, resolve=True)
    writer = SummaryWriter(run_dir / "tb")
    for epoch in range(first_epoch, cfg.trainer.epochs + 1):
        # The sample order depends only on (seed, epoch), so a resumed run sees the same batches.
        data.shuffle_generator.manual_seed(cfg.seed * 100_003 + epoch)
        lr = optimizer.param_groups[0]["lr"]
        progress = f"epoch {epoch}/{cfg.trainer.epochs}"
        train_metrics = train_one_epoch(
            model, criterion, optimizer, data.train_loader, device, f"{progress} train"
        )
        val_metrics = evaluate(model, criterion, data.val_loader, device, f"{progress} val")
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(val_metrics["loss"])
        else:
            scheduler.step()

        val_record = {f"val_{key}": value for key, value in val_metrics.items()}
        last_metrics = {
            "epoch": epoch,
            "lr": lr,
            **{f"train_{key}": value for key, value in train_metrics.items()},
            **val_record,
        }
        for key, value in train_metrics.items():
            writer.add_scalar(f"{key}/train", value, epoch)
        for key, value in val_metrics.items():
            writer.add_scalar(f"{key}/val", value, epoch)
        writer.add_scalar("lr", lr, epoch)
        writer.flush()

        is_best = val_metrics["top1"] > best["val_top1"]
        if is_best:
            best = {"epoch": epoch, **val_record}
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best": best,
            "metrics": last_metrics,
            "rng": rng_states(),
            "config": resolved_config,
        }
        save_checkpoint(state, checkpoint_dir / "last.pt")
        if is_best:
            save_checkpoint(state, checkpoint_dir / "best.pt")
        log.info(
            "%s  train loss %.3f top-1 %.1f%%  val loss %.3f top-1 %.1f%% top-5 %.1f%%  "
            "lr %.3g  %.0f img/s",
            progress, train_metrics["loss"], train_metrics["top1"], val_metrics["loss"],
            val_metrics["top1"], val_metrics["top5"], lr, train_metrics["images_per_s"],
        )  # fmt: skip
    writer.close()

    results = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "num_classes": data.num_classes,
        "params": num_params,
        "epochs": cfg.trainer.epochs,
        "device": str(device),
        "final": last_metrics,
        "best": best,
        "run_time_s": round(time.perf_counter() - started, 2),
    }
    _write_json(results, run_dir / "results.json")
    log.info(
        "Done: val top-1 %.2f%% (best %.2f%% at epoch %d) in %.0f s. Run dir: %s",
        last_metrics["val_top1"], best["val_top1"], best["epoch"], results["run_time_s"], run_dir,
    )  # fmt: skip
    log.info("Curves: tensorboard --logdir %s  (or --logdir outputs to compare runs)", run_dir / "tb")
    return results
