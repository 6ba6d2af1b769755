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
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from setrain.data import DataBundle, build_data
from setrain.data.transforms import batch_mixing
from setrain.engine.checkpoint import RunState, Trainees, checkpoint_of, load_checkpoint, restore, save_checkpoint
from setrain.engine.curves import RunCurves
from setrain.engine.distributed import (
    Processes,
    broadcast_buffers,
    broadcast_object,
    close_processes,
    init_processes,
    sum_across,
)
from setrain.engine.loop import EpochTotals, StepSettings, evaluate, train_steps
from setrain.engine.metrics_csv import write_epoch_row
from setrain.engine.optim import build_optimizer, build_scheduler, continue_schedule
from setrain.engine.rundir import check_same_run
from setrain.engine.runtime import (
    PRECISIONS,
    freed_memory_kept,
    process_gpu,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
    restore_rng_states,
)
from setrain.engine.signals import RunStopped, stop_on_signals
from setrain.errors import SetrainError
from setrain.files import write_atomically
from setrain.models import build_model

log = logging.getLogger(__name__)

HISTOGRAM_IMAGES = 64  # the fixed validation images whose SE gates are histogrammed each epoch


def _resume_path(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to continue from: `auto` is this run dir's last.pt, if any; a run dir (as
    the end of a run or a sweep prints it) is its checkpoints/last.pt; anything else a file."""
    if resume is None:
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.pt"
        if last.is_file():
            return last
        log.info("resume=auto: no %s yet, starting from scratch", last)
        return None
    if (Path(resume) / "checkpoints" / "last.pt").is_file():
        return Path(resume) / "checkpoints" / "last.pt"
    return Path(resume)


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
    device = resolve_device(cfg.trainer.device)
    processes = init_processes(device.type)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with freed_memory_kept(device.type == "cpu" and cfg.trainer.keep_freed_memory):
            return _train(cfg, _join_run_dir(processes, run_dir), device, processes)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        close_processes(processes)


def _train(cfg: DictConfig, run_dir: Path, device: torch.device, processes: Processes) -> dict:
    """Set up, then per epoch: train, validate, end the epoch (log, checkpoint, maybe stop early)."""
    started = time.perf_counter()
    device = _configure_process(cfg, device, processes)
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), device, processes.rank, processes.world_size)
    trainees, precision = _build_trainees(cfg, data, device, processes)
    config = OmegaConf.to_container(cfg, resolve=True)
    run = Run(cfg, config, run_dir, device, processes, data, trainees, RunState(), train_model=trainees.model)
    resume_from = _resume_path(cfg.resume, run.checkpoint_dir)
    if resume_from is not None:
        run.state = _resume(cfg, trainees, resume_from, processes, device)
    run.train_model = _wrap_for_training(trainees.model, cfg.trainer, device, processes)
    log.info(
        "Training %s (%s parameters) on %s for %d epochs on %s%s, precision %s; run dir %s",
        cfg.model.name, f"{run.num_params:,}", cfg.data.name, cfg.trainer.epochs, device,
        f" x {processes.world_size} processes" if processes.distributed else "", precision, run_dir,
    )  # fmt: skip
    run.curves = RunCurves(run_dir / "tb", processes.is_main, run.state.global_step or None, cfg)
    if processes.is_main:
        run.gate_images = next(iter(data.val_loader))[0][:HISTOGRAM_IMAGES].to(device, memory_format=trainees.step_settings.memory_format)
        if resume_from is None:
            run.curves.sample_images(next(iter(data.train_loader))[0].cpu())
    stopped_early_at = None
    with stop_on_signals() as stop:
        for epoch in range(run.state.epoch + 1, cfg.trainer.epochs + 1):
            train_metrics = _train_epoch(run, epoch, stop)
            val_metrics = _validate(run, epoch)
            if _end_epoch(run, epoch, train_metrics, val_metrics):
                stopped_early_at = epoch
                break
            if epoch < cfg.trainer.epochs and _stop_requested(stop, processes, device):
                # A signal during validation or the checkpoint writes, which no training step saw:
                # the epoch is saved, so stop before the next (after the last, cli.py stops).
                run.curves.close()
                raise RunStopped(
                    stop.signal_name or "SIGTERM",
                    f"Stopped by {stop.signal_name or 'another process'} after epoch {epoch}/{cfg.trainer.epochs}; "
                    f"saved {run.checkpoint_dir / 'last.pt'}. Continue with resume=auto hydra.run.dir={run_dir}",
                )
    return _finish(run, precision, stopped_early_at, time.perf_counter() - started)


@dataclass
class Run:
    """The pieces of one run that its epochs share; the trainer's functions below read and update it."""

    cfg: DictConfig
    config: dict  # cfg resolved, as checkpoints keep it
    run_dir: Path
    device: torch.device
    processes: Processes
    data: DataBundle
    trainees: Trainees
    state: RunState
    train_model: nn.Module  # the model wrapped for training (DDP, compiled)
    curves: RunCurves | None = None
    gate_images: torch.Tensor | None = None  # the fixed validation images whose SE gates are histogrammed

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.trainees.model.parameters())

    def checkpoint(self, totals: EpochTotals | None) -> dict | None:
        return checkpoint_of(self.trainees, self.state, totals, self.config, self.processes)


def _configure_process(cfg: DictConfig, device: torch.device, processes: Processes) -> torch.device:
    """This process's device, kernels and seeds; returns the device it trains on."""
    if processes.distributed and device.type == "cuda":
        device = process_gpu(processes.local_rank)
        torch.cuda.set_device(device)
    if not processes.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.trainer.deterministic
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    random.seed(cfg.seed + processes.rank)
    return device


def _build_trainees(cfg: DictConfig, data: DataBundle, device: torch.device, processes: Processes) -> tuple[Trainees, str]:
    """Model, optimizer, scheduler and the StepSettings of a training step; and the precision resolved."""
    trainer = cfg.trainer
    model = build_model(OmegaConf.to_container(cfg.model), data.num_classes)
    memory_format = torch.channels_last if resolve_channels_last(trainer.channels_last, device) else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if processes.distributed:
        torch.manual_seed(cfg.seed + processes.rank)  # after the shared init: own MixUp/augmentation draws
    effective_batch = cfg.data.batch_size * trainer.accumulate_grad_batches * processes.world_size
    optimizer = build_optimizer(cfg.optimizer, model, effective_batch)
    scheduler = build_scheduler(cfg.scheduler, optimizer, trainer.epochs)
    precision = resolve_precision(str(trainer.precision), device)
    settings = StepSettings(
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
    return Trainees(model, optimizer, scheduler, settings), precision


def _resume(cfg: DictConfig, trainees: Trainees, path: Path, processes: Processes, device: torch.device) -> RunState:
    """Continue from a checkpoint. The learning-rate plan follows the current settings: a changed
    optimizer.lr (or batch scaling), scheduler.* or a longer trainer.epochs rebuilds the schedule
    and advances it to the epoch reached; fewer epochs than done is refused."""
    checkpoint = load_checkpoint(path)
    check_same_run(cfg, checkpoint["config"], f"Checkpoint {path}")
    base_lrs = [group.get("initial_lr", group["lr"]) for group in trainees.optimizer.param_groups]
    state = restore(trainees, checkpoint, path, processes, device)
    epochs, saved = cfg.trainer.epochs, checkpoint["config"]
    if epochs < state.epoch:
        raise SetrainError(
            f"Checkpoint {path} has trained {state.epoch} epochs, more than trainer.epochs={epochs}; resume "
            f"with trainer.epochs={state.epoch} or more (more extends the schedule), or start a new run."
        )
    saved_lrs = [group.get("initial_lr", group["lr"]) for group in checkpoint["optimizer"]["param_groups"]]
    changed = [
        *([f"trainer.epochs {saved['trainer']['epochs']} -> {epochs}"] if saved["trainer"]["epochs"] != epochs else []),
        *([f"lr {saved_lrs[0]:.4g} -> {base_lrs[0]:.4g}"] if saved_lrs != base_lrs else []),
        *(["scheduler.*"] if OmegaConf.to_container(cfg.scheduler, resolve=True) != saved["scheduler"] else []),
    ]
    if changed:
        trainees.scheduler = continue_schedule(cfg.scheduler, trainees.optimizer, epochs, state.epoch, base_lrs)
        log.info(
            "Resuming with a changed plan (%s): the learning rate follows it from epoch %d, at %.4g.",
            ", ".join(changed), state.epoch + 1, trainees.optimizer.param_groups[0]["lr"],
        )  # fmt: skip
    inside = state.resumed_totals
    log.info(
        "Resumed from %s after epoch %d%s", path, state.epoch,
        f" and {inside.batches} batches of epoch {state.epoch + 1}" if inside else "",
    )  # fmt: skip
    return state


def _wrap_for_training(model: nn.Module, trainer: DictConfig, device: torch.device, processes: Processes) -> nn.Module:
    """SyncBatchNorm, DDP and torch.compile, as configured; the model itself stays unwrapped for
    evaluation and checkpoints."""
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
    return torch.compile(train_model, backend=backend) if backend else train_model


def _train_epoch(run: Run, epoch: int, stop) -> dict:
    """One epoch's training steps, with per-step logging, step checkpoints and stopping on a signal;
    the epoch's mean loss, top-1 and images/s over all processes."""
    cfg, state, processes, device = run.cfg, run.state, run.processes, run.device
    trainer, optimizer = cfg.trainer, run.trainees.optimizer
    progress = f"epoch {epoch}/{trainer.epochs}"
    run.data.set_epoch(cfg.seed, epoch)
    totals, state.resumed_totals = state.resumed_totals or EpochTotals().to(device), None
    batches = run.data.train_batches(start=totals.batches)
    if state.resumed_rng is not None:
        restore_rng_states(state.resumed_rng)
        state.resumed_rng = None
    num_batches = len(run.data.train_loader)
    bar = tqdm(
        batches, total=num_batches, initial=totals.batches, desc=f"{progress} train", leave=False,
        dynamic_ncols=True, disable=None if processes.is_main else True,
        unit="img", unit_scale=cfg.data.batch_size * processes.world_size,
    )  # fmt: skip
    epoch_start, seen_before = time.perf_counter(), totals.seen
    logged = (epoch_start, seen_before)
    for loss in train_steps(run.train_model, run.trainees.step_settings, optimizer, bar, num_batches, device, totals):
        state.global_step += 1
        at_log_step = state.global_step % trainer.log_every_n_steps == 0
        if at_log_step:
            logged = _log_step(run, bar, progress, loss.item(), totals, num_batches, logged)
        # Processes agree on stopping where they already synchronise: at logging steps.
        stopping = at_log_step and _stop_requested(stop, processes, device) if processes.distributed else stop.requested
        every_n = trainer.checkpoint_every_n_steps
        if stopping or (every_n and state.global_step % every_n == 0):
            _check_finite(totals.loss_sum.item(), progress)
            checkpoint = run.checkpoint(totals)
            if processes.is_main:
                save_checkpoint(checkpoint, run.checkpoint_dir / "last.pt")
        if stopping:
            run.curves.close()  # keep the per-step curves written since the last epoch
            raise RunStopped(
                stop.signal_name or "SIGTERM",
                f"Stopped by {stop.signal_name or 'another process'} at {progress}, step "
                f"{state.global_step}; saved {run.checkpoint_dir / 'last.pt'}. Continue with resume=auto "
                f"hydra.run.dir={run.run_dir}",
            )
    bar.close()
    loss_sum, correct, seen = sum_across(processes, totals.loss_sum, totals.correct, torch.tensor(totals.seen, device=device))
    _check_finite(loss_sum.item(), progress)
    return {
        "loss": loss_sum.item() / seen.item(),
        "top1": 100 * correct.item() / seen.item(),
        "images_per_s": (totals.seen - seen_before) * processes.world_size / (time.perf_counter() - epoch_start),
    }


def _log_step(run: Run, bar, progress: str, loss: float, totals: EpochTotals, num_batches: int, logged: tuple) -> tuple:
    """The step's loss and lr on the bar and the curves, or in a log line without a terminal
    (SLURM, nohup); returns the (time, images seen) the next line's images/s counts from."""
    _check_finite(loss, f"{progress}, step {run.state.global_step}")
    lr = run.trainees.optimizer.param_groups[0]["lr"]
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", refresh=False)
    run.curves.step(run.state.global_step, loss, lr)
    if not bar.disable:
        return logged
    now = time.perf_counter()
    speed = (totals.seen - logged[1]) * run.processes.world_size / (now - logged[0])
    log.info("%s step %d/%d  loss %.3f  lr %.3g  %.0f img/s", progress, totals.batches, num_batches, loss, lr, speed)
    return now, totals.seen


def _validate(run: Run, epoch: int) -> dict:
    """Val loss, top-1, top-5 (and the EMA's, as ema_*), without label smoothing, comparable across runs."""
    progress, settings = f"epoch {epoch}/{run.cfg.trainer.epochs}", run.trainees.step_settings
    criterion = nn.CrossEntropyLoss()
    broadcast_buffers(run.processes, run.trainees.model)
    metrics = evaluate(run.trainees.model, criterion, run.data.val_loader, run.device, f"{progress} val", settings, run.processes)
    if settings.ema is not None:
        broadcast_buffers(run.processes, settings.ema.module)
        ema = evaluate(settings.ema.module, criterion, run.data.val_loader, run.device, f"{progress} val EMA", settings, run.processes)
        metrics.update({f"ema_{key}": value for key, value in ema.items()})
    return metrics


def _end_epoch(run: Run, epoch: int, train_metrics: dict, val_metrics: dict) -> bool:
    """Step the scheduler, record the epoch, write curves and checkpoints; True to stop early."""
    trainer, state, scheduler = run.cfg.trainer, run.state, run.trainees.scheduler
    lr = run.trainees.optimizer.param_groups[0]["lr"]  # the epoch's, before the scheduler steps
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_metrics["loss"])
    else:
        scheduler.step()
    val_record = {f"val_{key}": value for key, value in val_metrics.items()}
    metrics = {"epoch": epoch, "lr": lr, **{f"train_{key}": value for key, value in train_metrics.items()}, **val_record}
    is_best = state.end_epoch(epoch, metrics, val_record)
    checkpoint = run.checkpoint(None)
    if run.processes.is_main:  # metrics.csv, then best.pt: if either is not written, the resume redoes this epoch
        write_epoch_row(run.run_dir / "metrics.csv", {"epoch": epoch, "step": state.global_step, **metrics})
        if is_best:
            save_checkpoint(checkpoint, run.checkpoint_dir / "best.pt")
        save_checkpoint(checkpoint, run.checkpoint_dir / "last.pt")
    run.curves.epoch(state.global_step, state.best["val_top1"], train_metrics, val_metrics, run.trainees.model, run.gate_images)
    log.info(
        "epoch %d/%d  train loss %.3f top-1 %.1f%%  val loss %.3f top-1 %.1f%% top-5 %.1f%%%s  lr %.3g  %.0f img/s",
        epoch, trainer.epochs, train_metrics["loss"], train_metrics["top1"], val_metrics["loss"],
        val_metrics["top1"], val_metrics["top5"],
        f"  EMA top-1 {val_metrics['ema_top1']:.1f}%" if "ema_top1" in val_metrics else "",
        lr, train_metrics["images_per_s"],
    )  # fmt: skip
    if trainer.early_stop_patience and state.stale_epochs >= trainer.early_stop_patience:
        log.info(
            "Early stop: val top-1 has not improved for %d epochs (best %.2f%% at epoch %d).",
            state.stale_epochs, state.best["val_top1"], state.best["epoch"],
        )  # fmt: skip
        return True
    return False


def _stop_requested(stop, processes: Processes, device: torch.device) -> bool:
    """Whether any process was asked to stop (a collective under torchrun: all must call it)."""
    if not processes.distributed:
        return stop.requested
    return sum_across(processes, torch.tensor(float(stop.requested), device=device))[0].item() > 0


def _finish(run: Run, precision: str, stopped_early_at: int | None, run_time: float) -> dict:
    """results.json and the hyperparameters' curves; the results."""
    cfg, state = run.cfg, run.state
    results = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "num_classes": run.data.num_classes,
        "params": run.num_params,
        "epochs": cfg.trainer.epochs,
        "stopped_early_at": stopped_early_at,
        "global_step": state.global_step,
        "device": str(run.device),
        "processes": run.processes.world_size,
        "precision": precision,
        "final": state.metrics,
        "best": state.best,
        "run_time_s": round(run_time, 2),
    }
    if run.processes.is_main:
        _write_results(results, run.run_dir / "results.json")
        run.curves.finish()
    log.info(
        "Done: val top-1 %.2f%% (best %.2f%% at epoch %d) in %.0f s.",
        state.metrics["val_top1"], state.best["val_top1"], state.best["epoch"], results["run_time_s"],
    )  # fmt: skip
    return results


def _write_results(results: dict, path: Path) -> None:
    """Atomically, like checkpoints; a failed write (a full disk) is one sentence."""
    try:
        write_atomically(path, lambda file: file.write((json.dumps(results, indent=2) + "\n").encode()))
    except OSError as error:
        raise SetrainError(
            f"Could not write {path} ({error.strerror or error}); the checkpoints are saved, so free "
            f"space or make {path.parent} writable, then rerun with resume=auto hydra.run.dir={path.parent}."
        ) from error
