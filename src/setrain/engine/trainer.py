"""`train(cfg, run_dir)`: the whole run, from config to checkpoints, curves and results.json.

One process, or one of several under `torchrun` (DDP); rank 0 alone writes. Checkpoints hold
everything a run needs to continue exactly where it stopped, even inside an epoch.
"""

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from setrain.data import build_data
from setrain.data.transforms import batch_mixing
from setrain.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from setrain.engine.curves import add_excitation_histograms, add_hparams, add_image_grid
from setrain.engine.distributed import (
    Processes,
    broadcast_buffers,
    broadcast_object,
    close_processes,
    gather_object,
    init_processes,
    sum_across,
)
from setrain.engine.loop import EpochTotals, Recipe, evaluate, train_steps
from setrain.engine.optim import build_optimizer, build_scheduler
from setrain.engine.rundir import check_same_run
from setrain.engine.runtime import (
    PRECISIONS,
    keep_freed_memory,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
    restore_rng_states,
    rng_states,
)
from setrain.engine.signals import RunStopped, stop_on_signals
from setrain.errors import SetrainError
from setrain.models import build_model

log = logging.getLogger(__name__)

HISTOGRAM_IMAGES = 64  # the fixed validation images whose SE gates are histogrammed each epoch


def check_trainer_options(trainer: DictConfig) -> None:
    """Refuse values the loop cannot honour before any data is loaded."""
    if trainer.epochs < 1:
        raise SetrainError(f"trainer.epochs={trainer.epochs} must be at least 1.")
    if str(trainer.precision) not in (*PRECISIONS, "auto"):
        raise SetrainError(f"trainer.precision={trainer.precision!r} is not known; use auto, 32, bf16 or 16.")
    if trainer.channels_last not in (True, False, "auto"):
        raise SetrainError(f"trainer.channels_last={trainer.channels_last!r} is not known; use auto, true or false.")
    for key in ("accumulate_grad_batches", "log_every_n_steps", "checkpoint_every_n_steps", "early_stop_patience"):
        value = trainer[key]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise SetrainError(f"trainer.{key}={value!r} must be a positive integer.")
    if trainer.grad_clip_norm is not None and trainer.grad_clip_norm <= 0:
        raise SetrainError(f"trainer.grad_clip_norm={trainer.grad_clip_norm} must be positive, or null for no clipping.")
    if trainer.ema_decay is not None and not 0 < trainer.ema_decay < 1:
        raise SetrainError(f"trainer.ema_decay={trainer.ema_decay} must be between 0 and 1, e.g. 0.9998, or null.")
    if not 0 <= trainer.label_smoothing < 1:
        raise SetrainError(f"trainer.label_smoothing={trainer.label_smoothing} must be in [0, 1), e.g. 0.1.")


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
    """Atomically, like checkpoints; a failed write (a full disk) is one sentence."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise SetrainError(
            f"Could not write {path} ({error.strerror or error}); the checkpoints are saved, so free "
            f"space or make {path.parent} writable, then rerun with resume=auto hydra.run.dir={path.parent}."
        ) from error


def _position_of_this_process(state: dict, processes: Processes) -> dict:
    """This process's epoch progress and random state from a checkpoint: its own when the
    checkpoint was saved by as many processes, rank 0's otherwise."""
    others = state.get("other_ranks", [])
    if len(others) != processes.world_size - 1:
        if processes.is_main:
            log.warning(
                "The checkpoint was saved by %d processes and %d continue it: each takes rank 0's "
                "random state, so the run goes on but not exactly as it would have.",
                len(others) + 1, processes.world_size,
            )  # fmt: skip
        return state
    return state if processes.rank == 0 else others[processes.rank - 1]


def _check_finite(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise SetrainError(
            f"The training loss became {loss} ({where}); lower the learning rate (optimizer.lr) "
            "or clip gradients (trainer.grad_clip_norm). The last good checkpoint was left untouched."
        )


def _join_run_dir(processes: Processes, run_dir: Path) -> Path:
    """Under torchrun every process starts Hydra, which names the run dir by the clock; all
    use rank 0's, and a process whose clock had ticked removes the empty dir Hydra made for it."""
    main_run_dir = broadcast_object(processes, run_dir)
    if main_run_dir != run_dir and not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    return main_run_dir


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train `cfg.model` on `cfg.data`, writing checkpoints/, tb/ and results.json into `run_dir`."""
    check_trainer_options(cfg.trainer)
    device = resolve_device(cfg.trainer.device)
    processes = init_processes(device.type)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, _join_run_dir(processes, run_dir), device, processes)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        close_processes(processes)


def _train(cfg: DictConfig, run_dir: Path, device: torch.device, processes: Processes) -> dict:
    started = time.perf_counter()
    trainer = cfg.trainer
    if processes.distributed and device.type == "cuda":
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
    if not processes.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not trainer.deterministic
    if device.type == "cpu" and trainer.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    random.seed(cfg.seed + processes.rank)

    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), device, processes.rank, processes.world_size)
    model = build_model(OmegaConf.to_container(cfg.model), data.num_classes)
    memory_format = torch.channels_last if resolve_channels_last(trainer.channels_last, device) else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if processes.distributed:
        torch.manual_seed(cfg.seed + processes.rank)  # after the shared init: own MixUp/augmentation draws
    num_params = sum(p.numel() for p in model.parameters())
    effective_batch = cfg.data.batch_size * trainer.accumulate_grad_batches * processes.world_size
    optimizer = build_optimizer(cfg.optimizer, model, effective_batch)
    scheduler = build_scheduler(cfg.scheduler, optimizer, trainer.epochs)
    precision = resolve_precision(str(trainer.precision), device)
    recipe = Recipe(
        criterion=nn.CrossEntropyLoss(label_smoothing=trainer.label_smoothing),
        autocast_dtype=PRECISIONS[precision],
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "16"),
        memory_format=memory_format,
        accumulate=trainer.accumulate_grad_batches,
        clip_norm=trainer.grad_clip_norm,
        mix=batch_mixing(trainer.mixup_alpha, trainer.cutmix_alpha, data.num_classes),
        ema=None if trainer.ema_decay is None else AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(trainer.ema_decay), use_buffers=True
        ),
    )  # fmt: skip
    val_criterion = nn.CrossEntropyLoss()  # without label smoothing, comparable across runs

    checkpoint_dir = run_dir / "checkpoints"
    first_epoch, global_step, stale_epochs = 1, 0, 0
    best, last_metrics, resumed_totals, resumed_rng = {"epoch": 0, "val_top1": -1.0}, {}, None, None
    resume_from = _resume_path(cfg.resume, checkpoint_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_same_run(cfg, state["config"], f"Checkpoint {resume_from}")
        load_model_state(model, state["model"], resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            recipe.scaler.load_state_dict(state["scaler"])
        if recipe.ema is not None and "ema" in state:
            recipe.ema.module.load_state_dict(state["ema"])
            recipe.ema.n_averaged.fill_(state["ema_updates"])
        first_epoch, best, last_metrics = state["epoch"] + 1, state["best"], state["metrics"]
        global_step, stale_epochs = state.get("global_step", 0), state.get("stale_epochs", 0)
        position = _position_of_this_process(state, processes)
        resumed_rng = position["rng"]
        if position.get("epoch_progress"):
            resumed_totals = EpochTotals(**position["epoch_progress"]).to(device)
        log.info(
            "Resumed from %s after epoch %d%s", resume_from, state["epoch"],
            f" and {resumed_totals.batches} batches of epoch {first_epoch}" if resumed_totals else "",
        )  # fmt: skip

    if trainer.sync_batchnorm and processes.distributed:
        if device.type != "cuda":
            raise SetrainError(
                "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                "set trainer.sync_batchnorm=false on CPUs."
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if processes.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    backend = resolve_compile(trainer.compile, device)
    if backend:
        train_model = torch.compile(train_model, backend=backend)

    log.info(
        "Training %s (%s parameters) on %s for %d epochs on %s%s, precision %s; run dir %s",
        cfg.model.name, f"{num_params:,}", cfg.data.name, trainer.epochs, device,
        f" x {processes.world_size} processes" if processes.distributed else "", precision, run_dir,
    )  # fmt: skip
    resolved_config = OmegaConf.to_container(cfg, resolve=True)
    writer = SummaryWriter(run_dir / "tb", purge_step=global_step or None) if processes.is_main else None
    histogram_images = None
    if writer is not None:
        histogram_images = next(iter(data.val_loader))[0][:HISTOGRAM_IMAGES].to(device, memory_format=memory_format)
        if resume_from is None:
            add_image_grid(writer, next(iter(data.train_loader))[0].cpu())

    def checkpoint_state(epoch_done: int, totals: EpochTotals | None) -> dict | None:
        """Everything needed to continue: after `epoch_done` epochs and, inside the next one,
        after the batches in `totals` (None at an epoch's end). Under torchrun every process
        calls it, as it gathers each one's position and random state; rank 0 gets the state."""
        cpu = torch.device("cpu")
        positions = gather_object(processes, {
            "epoch_progress": None if totals is None else vars(totals.to(cpu)),
            "rng": rng_states(),
        })  # fmt: skip
        if positions is None:
            return None
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": recipe.scaler.state_dict(),
            **({"ema": recipe.ema.module.state_dict(), "ema_updates": int(recipe.ema.n_averaged)} if recipe.ema else {}),
            "epoch": epoch_done,
            **positions[0],  # epoch_progress and rng: rank 0's, or the only process's
            "other_ranks": positions[1:],
            "global_step": global_step,
            "stale_epochs": stale_epochs,
            "best": best,
            "metrics": last_metrics,
            "config": resolved_config,
        }

    stopped_early_at = None
    num_batches = len(data.train_loader)
    with stop_on_signals() as stop:
        for epoch in range(first_epoch, trainer.epochs + 1):
            progress = f"epoch {epoch}/{trainer.epochs}"
            lr = optimizer.param_groups[0]["lr"]
            data.set_epoch(cfg.seed, epoch)
            totals = EpochTotals().to(device)
            if resumed_totals is not None:  # continue the epoch after the batches done before the checkpoint
                totals, resumed_totals = resumed_totals, None
            batches = data.train_batches(start=totals.batches)
            if resumed_rng is not None:
                restore_rng_states(resumed_rng)
                resumed_rng = None
            bar = tqdm(
                batches, total=num_batches, initial=totals.batches, desc=f"{progress} train", leave=False,
                dynamic_ncols=True, disable=None if processes.is_main else True,
                unit="img", unit_scale=cfg.data.batch_size * processes.world_size,
            )  # fmt: skip
            epoch_start, seen_before = time.perf_counter(), totals.seen
            logged_at, logged_seen = epoch_start, seen_before
            for loss in train_steps(train_model, recipe, optimizer, bar, num_batches, device, totals):
                global_step += 1
                at_log_step = global_step % trainer.log_every_n_steps == 0
                if at_log_step:
                    step_loss = loss.item()
                    _check_finite(step_loss, f"{progress}, step {global_step}")
                    step_lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{step_lr:.3g}", refresh=False)
                    if bar.disable:  # no terminal (SLURM, nohup): a log line instead of the bar
                        now = time.perf_counter()
                        speed = (totals.seen - logged_seen) * processes.world_size / (now - logged_at)
                        log.info("%s step %d/%d  loss %.3f  lr %.3g  %.0f img/s", progress, totals.batches,
                                 num_batches, step_loss, step_lr, speed)  # fmt: skip
                        logged_at, logged_seen = now, totals.seen
                    if writer is not None:
                        writer.add_scalar("loss/train_step", step_loss, global_step)
                        writer.add_scalar("lr/step", step_lr, global_step)
                # Processes agree on stopping where they already synchronise: at logging steps.
                stopping = stop.requested if not processes.distributed else (
                    at_log_step and sum_across(processes, torch.tensor(float(stop.requested), device=device))[0].item() > 0
                )  # fmt: skip
                every_n = trainer.checkpoint_every_n_steps
                if stopping or (every_n and global_step % every_n == 0):
                    _check_finite(totals.loss_sum.item(), progress)
                    state = checkpoint_state(epoch - 1, totals)
                    if processes.is_main:
                        save_checkpoint(state, checkpoint_dir / "last.pt")
                if stopping:
                    if writer is not None:
                        writer.close()  # keep the per-step curves written since the last epoch
                    raise RunStopped(
                        stop.signal_name or "SIGTERM",
                        f"Stopped by {stop.signal_name or 'another process'} at {progress}, step "
                        f"{global_step}; saved {checkpoint_dir / 'last.pt'}. Continue with resume=auto "
                        f"hydra.run.dir={run_dir}",
                    )
            bar.close()

            loss_sum, correct, seen = sum_across(
                processes, totals.loss_sum, totals.correct, torch.tensor(totals.seen, device=device)
            )
            _check_finite(loss_sum.item(), progress)
            train_metrics = {
                "loss": loss_sum.item() / seen.item(),
                "top1": 100 * correct.item() / seen.item(),
                "images_per_s": (totals.seen - seen_before) * processes.world_size / (time.perf_counter() - epoch_start),
            }
            broadcast_buffers(processes, model)
            val_metrics = evaluate(model, val_criterion, data.val_loader, device, f"{progress} val", recipe, processes)
            if recipe.ema is not None:
                broadcast_buffers(processes, recipe.ema.module)
                ema_metrics = evaluate(recipe.ema.module, val_criterion, data.val_loader, device, f"{progress} val EMA", recipe, processes)
                val_metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
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
            is_best = val_metrics["top1"] > best["val_top1"]
            if is_best:
                best = {"epoch": epoch, **val_record}
            stale_epochs = 0 if is_best else stale_epochs + 1
            state = checkpoint_state(epoch, None)
            if processes.is_main:
                for key, value in train_metrics.items():
                    writer.add_scalar(f"{key}/train", value, epoch)
                for key, value in val_metrics.items():  # EMA's as e.g. top1/val_ema, beside top1/val
                    writer.add_scalar(f"{key.removeprefix('ema_')}/val{'_ema' * key.startswith('ema_')}", value, epoch)
                writer.add_scalar("lr", lr, epoch)
                add_excitation_histograms(writer, model, histogram_images, epoch)
                writer.flush()
                save_checkpoint(state, checkpoint_dir / "last.pt")
                if is_best:
                    save_checkpoint(state, checkpoint_dir / "best.pt")
            log.info(
                "%s  train loss %.3f top-1 %.1f%%  val loss %.3f top-1 %.1f%% top-5 %.1f%%%s  lr %.3g  %.0f img/s",
                progress, train_metrics["loss"], train_metrics["top1"], val_metrics["loss"],
                val_metrics["top1"], val_metrics["top5"],
                f"  EMA top-1 {val_metrics['ema_top1']:.1f}%" if recipe.ema is not None else "",
                lr, train_metrics["images_per_s"],
            )  # fmt: skip
            if trainer.early_stop_patience and stale_epochs >= trainer.early_stop_patience:
                stopped_early_at = epoch
                log.info(
                    "Early stop: val top-1 has not improved for %d epochs (best %.2f%% at epoch %d).",
                    stale_epochs, best["val_top1"], best["epoch"],
                )  # fmt: skip
                break
            # A signal during validation or the checkpoint writes, which no training step saw: the
            # epoch is saved, so stop before the next (after the last, cli.py stops once it is done).
            if epoch < trainer.epochs and (stop.requested if not processes.distributed else (
                sum_across(processes, torch.tensor(float(stop.requested), device=device))[0].item() > 0
            )):  # fmt: skip
                if writer is not None:
                    writer.close()
                raise RunStopped(
                    stop.signal_name or "SIGTERM",
                    f"Stopped by {stop.signal_name or 'another process'} after {progress}; saved "
                    f"{checkpoint_dir / 'last.pt'}. Continue with resume=auto hydra.run.dir={run_dir}",
                )

    results = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "num_classes": data.num_classes,
        "params": num_params,
        "epochs": trainer.epochs,
        "stopped_early_at": stopped_early_at,
        "global_step": global_step,
        "device": str(device),
        "processes": processes.world_size,
        "precision": precision,
        "final": last_metrics,
        "best": best,
        "run_time_s": round(time.perf_counter() - started, 2),
    }
    if processes.is_main:
        _write_json(results, run_dir / "results.json")
        add_hparams(writer, cfg, {
            "best_val_top1": best["val_top1"], "final_val_top1": last_metrics["val_top1"],
            "final_val_top5": last_metrics["val_top5"], "final_val_loss": last_metrics["val_loss"],
        })  # fmt: skip
        writer.close()
    log.info(
        "Done: val top-1 %.2f%% (best %.2f%% at epoch %d) in %.0f s. Run dir: %s",
        last_metrics["val_top1"], best["val_top1"], best["epoch"], results["run_time_s"], run_dir,
    )  # fmt: skip
    log.info("Curves: tensorboard --logdir %s  (or --logdir outputs to compare runs)", run_dir / "tb")
    return results
