"""What TensorBoard shows (README, TensorBoard): the run's curves (RunCurves), its hyperparameters
for the HPARAMS tab, SE gates and sample images.

The scheme: tb/train, tb/val (and tb/val_ema) are runs with the same tags, so the train and val
curves of a metric are one chart; the epoch's loss and accuracy are one group, `epoch/`, which
TensorBoard sorts first and opens (it opens the first group only); every scalar's step is the
optimizer step, per-step and per-epoch curves alike. tb/ itself holds the gates, the images and
the hparams session, whose metrics are the last values of tb/val and tb/train.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from setrain.errors import SetrainError
from setrain.models.se import se_blocks, stage_of

IMAGES_IN_GRID = 32
# An epoch's metrics (train_metrics, val_metrics) by tag; the same tag in tb/train and tb/val.
EPOCH_TAGS = {"loss": "epoch/loss", "top1": "epoch/top1", "top5": "epoch/top5", "images_per_s": "speed/images_per_s"}
# HPARAMS columns: (run below tb/, tag, name shown); a metric is the last value of its curve.
HPARAMS_METRICS = [
    ("val", "epoch/best_top1", "best val top-1 (%)"),
    ("val", "epoch/top1", "val top-1 (%)"),
    ("val", "epoch/top5", "val top-5 (%)"),
    ("val", "epoch/loss", "val loss"),
    ("train", "epoch/loss", "train loss"),
]
NOT_HPARAMS = ("resume", "resume_force")  # where a run continues from, not how it trains
_UNSET = object()


def hparams_of(cfg: DictConfig, overrides: list[str], swept: set[str]) -> dict[str, int | float | str | bool]:
    """The run's settings for HPARAMS: the keys the sweep varies, then the others the command line
    set, then model.name and data.name, each with its config value's type (an int is a number, not
    text). Only these: TensorBoard ticks the first few columns, so the swept keys must lead."""
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)]
    texts = {o.key_or_group: o.get_value_element_as_str() for o in OverridesParser.create().parse_overrides(overrides)}
    ordered = sorted(key for key in keys if key in swept) + sorted(key for key in keys if key not in swept)
    hparams = {}
    for key in [*ordered, "model.name", "data.name"]:
        value = OmegaConf.select(cfg, key, default=_UNSET)
        if key in NOT_HPARAMS or key in hparams or key in ("model", "data"):  # a group's choice is model.name
            continue
        if value is _UNSET or OmegaConf.is_config(value):  # a config group's choice, e.g. optimizer=adam
            value = texts[key]
        hparams[key] = "null" if value is None else value
    return hparams


def command_line() -> tuple[list[str], set[str]]:
    """The overrides the run was started with and, in a multirun, the keys its sweep varies: those
    not in override_dirname's exclude_keys (setrain.cli.name_jobs_by_swept_keys puts the rest there)."""
    if not HydraConfig.initialized():  # train() called from Python
        return [], set()
    hydra = HydraConfig.get()
    overrides = list(hydra.overrides.task)
    if hydra.mode != RunMode.MULTIRUN:
        return overrides, set()
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}
    return overrides, keys - set(hydra.job.config.override_dirname.exclude_keys)


def start_session(writer: SummaryWriter, cfg: DictConfig) -> None:
    """The HPARAMS tab's experiment (columns) and the start of this run's session, as TensorBoard's
    hparams plugin reads them, so a sweep's running jobs are in the table too. Every job of a sweep
    writes the same columns, the swept keys marked as differing, so whichever experiment
    TensorBoard picks puts them first."""
    overrides, swept = command_line()
    hparams = hparams_of(cfg, overrides, swept)
    types = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING}
    infos = [
        api_pb2.HParamInfo(name=key, type=types.get(type(value), api_pb2.DATA_TYPE_FLOAT64), differs=key in swept)
        for key, value in hparams.items()
    ]
    metrics = [
        api_pb2.MetricInfo(name=api_pb2.MetricName(group=group, tag=tag), display_name=name)
        for group, tag, name in HPARAMS_METRICS
    ]
    start = plugin_data_pb2.SessionStartInfo()
    for key, value in hparams.items():
        field = {bool: "bool_value", str: "string_value"}.get(type(value), "number_value")
        setattr(start.hparams[key], field, value)
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    add_hparams_data(writer, metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))
    add_hparams_data(writer, metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start))


def add_hparams_data(writer: SummaryWriter, tag: str, data: plugin_data_pb2.HParamsPluginData) -> None:
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))]))


@torch.inference_mode()
def add_excitation_histograms(writer: SummaryWriter, model: nn.Module, images: Tensor, step: int) -> None:
    """Histograms of the SE gates per stage on a fixed batch (paper Sec. 7): how they spread
    and saturate as training goes on. A plain network has none."""
    blocks = se_blocks(model)
    if not blocks:
        return
    gates: dict[str, list[Tensor]] = {}
    handles = [
        block.excitation.register_forward_hook(
            lambda module, inputs, gate, stage=stage_of(name): gates.setdefault(stage, []).append(gate.flatten().float().cpu())
        )
        for name, block in blocks.items()
    ]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for stage, values in gates.items():
        writer.add_histogram(f"se_gates/{stage.replace(' ', '_')}", torch.cat(values), step)


def add_image_grid(writer: SummaryWriter, images: Tensor) -> None:
    """The first training batch as the network sees it (augmented; each image rescaled to 0..1)."""
    grid = make_grid(images[:IMAGES_IN_GRID].float().cpu(), nrow=8, normalize=True, scale_each=True)
    writer.add_image("samples/train_batch", grid, 0)


class RunCurves:
    """The run's TensorBoard curves, in one place: rank 0 writes them, other processes call the
    same methods and nothing happens. A write that fails (a full disk, a read-only dir) stops the
    run with one sentence; the checkpoints written so far stay."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None, cfg: DictConfig):
        """`purge_step`: the step a resumed run continues from (its session started before)."""
        self.log_dir, self.purge_step, self.writers = log_dir, purge_step, {}
        if enabled:
            for run in ("", "train", "val"):
                self._writer(run)
            if purge_step is None:
                with self._writing():
                    start_session(self._writer(""), cfg)

    def _writer(self, run: str) -> SummaryWriter:
        """The writer of tb/<run> (tb/ itself for ""), made on first use (val_ema with the first EMA metrics)."""
        if run not in self.writers:
            with self._writing():
                self.writers[run] = SummaryWriter(self.log_dir / run, purge_step=self.purge_step)
        return self.writers[run]

    @contextmanager
    def _writing(self):
        try:
            yield
        except (OSError, RuntimeError) as error:
            self.writers = {}  # closing them would raise again
            raise SetrainError(
                f"Could not write the TensorBoard curves in {self.log_dir} ({getattr(error, 'strerror', None) or error}); "
                f"free space or make it writable, then continue with resume=auto hydra.run.dir={self.log_dir.parent}."
            ) from error

    def sample_images(self, images: Tensor) -> None:
        if self.writers:
            with self._writing():
                add_image_grid(self._writer(""), images)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writers:
            with self._writing():
                self._writer("train").add_scalar("step/loss", loss, step)
                self._writer("train").add_scalar("step/lr", lr, step)

    def epoch(self, step: int, best_top1: float, train: dict, val: dict, model: nn.Module, gate_images: Tensor) -> None:
        """An epoch's train and val metrics (the EMA's in tb/val_ema) and SE gates at optimizer step `step`."""
        if not self.writers:
            return
        with self._writing():
            for run, metrics in (("train", train), ("val", val)):
                for key, value in metrics.items():
                    ema = key.startswith("ema_")
                    tag = EPOCH_TAGS.get(key.removeprefix("ema_"), f"epoch/{key.removeprefix('ema_')}")
                    self._writer(f"{run}_ema" if ema else run).add_scalar(tag, value, step)
            self._writer("val").add_scalar("epoch/best_top1", best_top1, step)
            add_excitation_histograms(self._writer(""), model, gate_images, step)
            for writer in self.writers.values():
                writer.flush()

    def finish(self) -> None:
        """The session's end: HPARAMS shows the run as finished."""
        if self.writers:
            with self._writing():
                end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
                add_hparams_data(self._writer(""), metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))
        self.close()

    def close(self) -> None:
        with self._writing():
            for writer in self.writers.values():
                writer.close()
        self.writers = {}
