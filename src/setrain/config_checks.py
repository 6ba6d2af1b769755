"""A config Hydra could not compose, or composed but setrain cannot use, said in one sentence.

Hydra refuses unknown files (`model=se_resnet51`) and misspelt keys (`trainer.epoch=3`) over many
lines; `config_error_sentence` says it in one. The YAML files declare no types and `+key=value`
adds any key, so Hydra accepts `trainer.epochs=ten` or `+trainer.epoch=3`; `check_values` refuses
those before training would trip over them, or silently ignore them.
"""

import copy
import functools
import json
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

import yaml
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from setrain.data import DECODERS, PIPELINES
from setrain.engine.optim import build_optimizer, build_scheduler
from setrain.engine.runtime import PRECISIONS
from setrain.errors import SetrainError

# Groups whose keys are the arguments of what they build (a model, a dataset, a torch class):
# their builders refuse unknown keys themselves, naming the ones they take.
BUILT_GROUPS = ("model", "data", "optimizer", "scheduler")
# Keys that take values of several types, so their default's type says nothing (32 or bf16; false
# or a torch.compile backend name; auto or true); whoever reads them checks them.
ANY_TYPE_KEYS = ("trainer.precision", "trainer.compile", "trainer.channels_last", "model.se.fused")


# What composing a config raises for the user's mistakes: Hydra's errors, and a file of their own
# (`--config-dir`) that is not YAML or not UTF-8 text.
CONFIG_ERRORS = (HydraException, yaml.YAMLError, UnicodeDecodeError)


def config_error_sentence(error: HydraException | yaml.YAMLError | UnicodeDecodeError) -> str:
    """Hydra's report of a config it could not compose, as one sentence naming the accepted values;
    a config file that does not parse (`--config-dir` holds the user's own) reaches here as YAML's."""
    if isinstance(error, yaml.YAMLError):
        return yaml_error_sentence(error)
    if isinstance(error, UnicodeDecodeError):
        return encoding_error_sentence(error)
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not in configs/{group}/; choose one of: {', '.join(error.options)}."
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.parent_node is not None:
        return not_a_key(cause.full_key, [str(key) for key in cause.parent_node if key != "hydra"])
    if isinstance(error, OverrideParseException):
        reason = error.message.splitlines()[0]
        return (
            f"Could not parse the override {error.override!r} ({reason}); see "
            "https://hydra.cc/docs/advanced/override_grammar/basic/ for the syntax."
        )
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def encoding_error_sentence(error: UnicodeDecodeError) -> str:
    """Which config file is not UTF-8: Hydra's file loader has its path (`full_path`) in its frame."""
    paths = [frame.f_locals["full_path"] for frame, _ in traceback.walk_tb(error.__traceback__) if "full_path" in frame.f_locals]
    what = f"Config file {paths[-1]}" if paths else "A config file"
    return f"{what} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at position {error.start}); save it as UTF-8."


def yaml_error_sentence(error: yaml.YAMLError) -> str:
    """Where YAML stopped reading a file and why ("found duplicate key a at line 2, column 1")."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return f"A config file is not valid YAML ({error}); fix its syntax."
    context = f", {error.context}" if error.context else ""
    return (
        f"Config file {mark.name} is not valid YAML ({error.problem} at line {mark.line + 1}, column "
        f"{mark.column + 1}{context}); fix its syntax."
    )


def not_a_key(key: str, known: list[str]) -> str:
    """The sentence for a key that is not in the config, given the keys beside it."""
    parent = key.rpartition(".")[0]
    where = f"of {parent}" if parent else "at the top level"
    return f"{key} is not a config key; the keys {where} are: {', '.join(sorted(known))}."


def check_values(cfg: DictConfig) -> None:
    """Refuse a `${...}` that does not resolve, a key that nothing reads, a value of another type
    than its default in configs/, a learning rate of zero or less (torch accepts 0), and a
    learning-rate schedule that fails (check_schedule).

    The defaults are the same config files (the `model=`, `data=`, ... chosen) composed again
    without the command line's values; run inside a Hydra app.
    """
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        reason = str(error).splitlines()[0]
        raise SetrainError(
            f"{error.full_key} cannot be resolved ({reason}); fix its ${{...}} reference."
        ) from error
    hydra_cfg = HydraConfig.get()
    choices = [
        f"{group}={choice}"
        for group, choice in hydra_cfg.runtime.choices.items()
        if choice is not None and not group.startswith("hydra/")
    ]
    sources = tuple(f"{source.schema}://{source.path}" for source in hydra_cfg.runtime.config_sources)
    defaults = copy.deepcopy(_composed_defaults(hydra_cfg.job.config_name, tuple(choices), sources))
    unknown = _unknown_key({key: value for key, value in values.items() if key not in BUILT_GROUPS}, defaults)
    if unknown:
        raise SetrainError(not_a_key(*unknown))
    flat = dict(_leaves(values))
    for key, default in _leaves(defaults):
        kind = None if key in ANY_TYPE_KEYS else _expected_kind(default, flat.get(key))
        if kind:
            value = json.dumps(flat.get(key))
            raise SetrainError(f"{key}={value} must be {kind}, like its default {json.dumps(default)}.")
    if flat.get("optimizer.lr", 1) <= 0:
        example = defaults["optimizer"]["lr"]
        raise SetrainError(f"optimizer.lr={flat['optimizer.lr']} must be greater than 0, e.g. {example}.")
    if flat.get("optimizer.momentum", 0) >= 1:  # torch refuses < 0 only; from 1 up the step grows without bound
        raise SetrainError(f"optimizer.momentum={flat['optimizer.momentum']} must be below 1, e.g. 0.9.")
    check_trainer_options(cfg.trainer)
    check_data_options(cfg.data)
    check_schedule(cfg)


@functools.cache
def _composed_defaults(config_name: str, choices: tuple[str, ...], sources: tuple[str, ...]) -> dict:
    """The config files' values for these group choices, composed once per process: a sweep's jobs
    (Hydra's basic launcher runs them in one process) mostly share their choices. `sources` names
    the config search path, which the composition depends on."""
    return OmegaConf.to_container(compose(config_name, overrides=list(choices)))


def check_trainer_options(trainer: DictConfig) -> None:
    """Refuse trainer values the loop cannot honour; run before the run dir is made (check_values)."""
    if trainer.epochs < 1:
        raise SetrainError(f"trainer.epochs={trainer.epochs} must be at least 1.")
    if str(trainer.precision) not in (*PRECISIONS, "auto"):
        raise SetrainError(f"trainer.precision={trainer.precision!r} is not known; use auto, 32, bf16 or 16.")
    if trainer.channels_last not in (True, False, "auto"):
        raise SetrainError(f"trainer.channels_last={trainer.channels_last!r} is not known; use auto, true or false.")
    _check_compile(trainer.compile)
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


def check_data_options(data: Mapping) -> None:
    """Refuse loader values no dataset can honour; run before the run dir is made (check_values)
    and on the data config that evaluate, predict and analyze change (`setrain.trained`)."""
    batch_size, num_workers = data["batch_size"], data["num_workers"]
    if batch_size < 2:  # BatchNorm fails on one image whose feature map is 1x1 (e.g. 32 px into ResNet-50)
        raise SetrainError(
            f"data.batch_size={batch_size} is too small: BatchNorm needs at least 2 images per batch "
            "to train; use 2 or more."
        )
    if num_workers < 0:
        raise SetrainError(f"data.num_workers={num_workers} must be 0 (load in the main process) or more.")
    if (pipeline := data.get("pipeline", "auto")) not in PIPELINES:
        raise SetrainError(f"data.pipeline={pipeline!r} is not known; use auto, workers or device.")
    if (repeats := data.get("repeated_augment", 1)) < 1:
        raise SetrainError(
            f"data.repeated_augment={repeats} must be 1 (off) or more: the copies of each image per epoch, e.g. 3."
        )
    if (decode := data.get("decode", "device")) not in DECODERS:
        raise SetrainError(f"data.decode={decode!r} is not known; use device (nvJPEG on CUDA) or workers (libjpeg-turbo).")


def _check_compile(compile) -> None:
    """true, false, auto, or a backend torch.compile knows (torch._dynamo would raise mid-setup)."""
    if isinstance(compile, bool) or compile == "auto":
        return
    from torch._dynamo import list_backends  # slow to import: only for a backend name

    if compile not in list_backends(exclude_tags=()):  # the debugging backends too
        raise SetrainError(
            f"trainer.compile={compile!r} is not known; use true, false, auto or a torch.compile backend: "
            f"{', '.join(list_backends())}."
        )


def check_schedule(cfg: DictConfig) -> None:
    """Step the learning-rate schedule through every epoch of the run on a stand-in parameter: a
    value that fails only when stepped (`scheduler.T_max=0` divides by zero after the first epoch)
    is refused before training, whatever the scheduler class."""
    epochs, epoch = cfg.trainer.epochs, 0  # the trainer refuses fewer than 1 epoch
    optimizer = build_optimizer(cfg.optimizer, nn.Linear(1, 1), cfg.data.batch_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's: the schedule steps before the optimizer
            scheduler = build_scheduler(cfg.scheduler, optimizer, epochs)
            for epoch in range(1, epochs + 1):
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(1.0)  # a validation loss that never improves
                else:
                    scheduler.step()
    except (ArithmeticError, ValueError, TypeError, LookupError) as error:
        values = OmegaConf.to_container(cfg.scheduler, resolve=True)
        values = ", ".join(f"scheduler.{key}={json.dumps(v)}" for key, v in values.items() if key != "_target_")
        when = f"at epoch {epoch} of {epochs}" if epoch else "before the first epoch"
        reason = f"{type(error).__name__}: {str(error).rstrip('.')}"
        raise SetrainError(
            f"The learning-rate schedule fails {when} ({reason}); fix the scheduler values ({values})."
        ) from error


def check_values_before_run(config: DictConfig) -> None:
    """`check_values` on the whole config (with its `hydra` node) before Hydra runs the job, so that
    a refused value leaves no run dir behind: Hydra makes it and writes .hydra/ before the task.

    Works on a copy with the run dir filled in as Hydra's run_job will fill it, so that
    `${hydra:runtime.output_dir}` resolves; run_job sets HydraConfig again right after.
    """
    config = copy.deepcopy(config)
    with read_write(config.hydra.runtime):
        config.hydra.runtime.output_dir = str(Path(config.hydra.run.dir).absolute())
    HydraConfig.instance().set_config(config)
    with read_write(config), open_dict(config):
        del config["hydra"]
    check_values(config)


def _unknown_key(values: dict, defaults: dict, prefix: str = "") -> tuple[str, list[str]] | None:
    """The first key of `values` that `defaults` lacks, with the keys beside it that it has."""
    for key, value in values.items():
        if key not in defaults:
            return f"{prefix}{key}", list(defaults)
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            unknown = _unknown_key(value, defaults[key], f"{prefix}{key}.")
            if unknown:
                return unknown
    return None


def _leaves(node: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _expected_kind(default, value) -> str | None:
    """What `value` must be to have the type of `default`; None if it has, or if any type goes."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None
