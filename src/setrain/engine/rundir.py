"""A run directory holds one run: used by one process at a time, never restarted from scratch
over an earlier run, and continued only with the model and dataset it was trained with."""

import errno
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from setrain.errors import SetrainError

# Model keys that may change when a run is continued: where the weights came from, not what they
# are, and how the fused SE tail computes the same function.
CONTINUABLE_MODEL_KEYS = ("model.pretrained", "model.pretrained_format", "model.se.fused")
# What a run leaves that another may continue or read: a dir holding one is never removed.
RUN_RESULTS = ("checkpoints/last.pt", "checkpoints/best.pt", "results.json")


def lock_run_dir(run_dir: Path) -> int:
    """Create `run_dir` and lock it for this process; returns the lock's descriptor.

    The lock is `flock` on the directory itself, so no file is left behind, and the kernel releases
    it when the process ends, however it ends: a killed run never blocks the next one.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        descriptor = os.open(run_dir, os.O_RDONLY)
    except OSError as error:
        raise SetrainError(
            f"Cannot write into the run directory {run_dir} ({error.strerror}); choose a writable "
            "place with hydra.run.dir=<path> (hydra.sweep.dir=<path> with -m)."
        ) from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise SetrainError(
            f"The run directory {run_dir} is in use by another setrain process; wait for it to end, "
            "or choose another hydra.run.dir."
        ) from None
    return descriptor


def check_earlier_run(run_dir: Path, cfg: DictConfig) -> None:
    """A run dir that holds a run (checkpoints/last.pt) may only be continued (resume=...), and
    only with the model and data of its .hydra/config.yaml, read before Hydra replaces it."""
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        return
    if cfg.resume is None:
        raise SetrainError(
            f"The run directory {run_dir} already holds a run (checkpoints/last.pt); continue it with "
            "resume=auto, or start a new run in another hydra.run.dir."
        )
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        check_same_run(cfg, OmegaConf.to_container(OmegaConf.load(saved)), f"The run in {run_dir}")


def _identity(config: Mapping) -> dict[str, object]:
    """What makes two runs the same run, as flat `key: value` pairs: the model and the dataset."""
    flat = {"data.name": config["data"]["name"]}
    pending = [("model", config["model"])]
    while pending:
        prefix, node = pending.pop()
        for key, value in node.items():
            if isinstance(value, Mapping):
                pending.append((f"{prefix}.{key}", value))
            elif f"{prefix}.{key}" not in CONTINUABLE_MODEL_KEYS:
                flat[f"{prefix}.{key}"] = value
    return flat


def check_same_run(cfg: DictConfig, saved_config: Mapping, source: str) -> None:
    """Refuse to continue a run with another model, SE options or dataset, unless resume_force=true.

    `saved_config` is the config the run was trained with (a checkpoint's "config", or its run
    dir's .hydra/config.yaml); `source` starts the sentence ("Checkpoint x.pt"). Everything else
    (epochs, learning rate, batch size, data.root, ...) may change when a run is continued.
    """
    if cfg.get("resume_force"):
        return
    ours = _identity({"model": OmegaConf.to_container(cfg.model, resolve=True), "data": cfg.data})
    theirs = _identity(saved_config)
    differing = sorted(key for key in set(ours) | set(theirs) if ours.get(key) != theirs.get(key))
    # Another model or dataset makes its options' differences noise: name only those then.
    differing = [key for key in ("data.name", "model.name") if key in differing] or differing
    if differing:
        shown = ", ".join(f"{key}={theirs.get(key)} (not {ours.get(key)})" for key in differing[:3])
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        raise SetrainError(
            f"{source} was trained with {shown}{more}; resume with the same model and data, or pass "
            "resume_force=true to continue it anyway."
        )


@dataclass
class RunDirBefore:
    """What a run dir held before this run's Hydra wrote into it (.hydra/, train.log), so that a
    run refused after that can be undone (undo_refused_run)."""

    run_dir: Path
    paths: set[Path] | None  # every path inside it; None where it did not exist
    hydra_files: dict[str, bytes]  # .hydra/*, which Hydra replaces
    log_sizes: dict[str, int]  # Hydra's <job>.log (train.log), which it appends to
    results: list[tuple | None]  # RUN_RESULTS as (inode, mtime, size): a changed one was saved by this run
    made_from: Path  # the highest folder this run creates: the run dir or one above it


def before_run(run_dir: Path) -> RunDirBefore:
    made_from = run_dir
    while not made_from.parent.exists():
        made_from = made_from.parent
    exists = run_dir.is_dir()
    hydra = run_dir / ".hydra"
    return RunDirBefore(
        run_dir,
        set(run_dir.rglob("*")) if exists else None,
        {file.name: file.read_bytes() for file in hydra.iterdir() if file.is_file()} if hydra.is_dir() else {},
        {log.name: log.stat().st_size for log in run_dir.glob("*.log")} if exists else {},
        _results(run_dir),
        made_from,
    )


def new_run_dir(run_dir: Path) -> RunDirBefore:
    """A run dir that did not exist before this run (a sweep's job dir made during the sweep)."""
    return RunDirBefore(run_dir, None, {}, {}, [None] * len(RUN_RESULTS), run_dir)


def _results(run_dir: Path) -> list[tuple | None]:
    stamps = []
    for name in RUN_RESULTS:
        try:
            found = (run_dir / name).stat()
            stamps.append((found.st_ino, found.st_mtime_ns, found.st_size))
        except OSError:
            stamps.append(None)
    return stamps


def undo_refused_run(before: RunDirBefore) -> None:
    """Remove what a refused run made in its run dir, put back the .hydra/ files it replaced and
    cut its lines from the log it appended to, so a mistake leaves no half-made run dir behind. A
    checkpoint or results.json this run saved before it was refused is kept, with everything else
    (it continues with resume=auto). Best effort: a file that cannot be removed stays."""
    run_dir = before.run_dir
    if _results(run_dir) != before.results:
        return
    for handler in list(logging.getLogger().handlers):  # Hydra's train.log, open in the run dir
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir):
            logging.getLogger().removeHandler(handler)
            handler.close()
    try:
        if before.paths is None:
            shutil.rmtree(run_dir)
            for folder in run_dir.parents:  # the empty folders made for it (outputs/<date>/)
                if not folder.is_relative_to(before.made_from):
                    break
                folder.rmdir()
            return
        for path in sorted(set(run_dir.rglob("*")) - before.paths, reverse=True):  # files before their folders
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if before.hydra_files:
            (run_dir / ".hydra").mkdir(exist_ok=True)
            for name, content in before.hydra_files.items():
                (run_dir / ".hydra" / name).write_bytes(content)
        for name, size in before.log_sizes.items():
            os.truncate(run_dir / name, size)
    except OSError:
        pass


# Characters Hydra's override grammar takes unquoted in a value (and a shell in a word): a path
# made of them pastes into `checkpoint=<path>` or `resume=<path>` as it is.
_PASTEABLE = re.compile(r"[^A-Za-z0-9_.+-]+")
_BRACKETS = re.compile(r"[][(){}'\" ]")


def swept_keys(task_overrides: list[str], sweeper_params: Mapping | None) -> set[str]:
    """The keys a multirun varies: sweeps on its command line (`a=1,2`, `range(...)`, `choice(...)`)
    and the sweeper's `params` (an experiment's `hydra.sweeper.params`, Optuna's search space)."""
    parsed = OverridesParser.create().parse_overrides(task_overrides)
    return {o.key_or_group for o in parsed if o.is_sweep_override()} | set(sweeper_params or {})


def job_dir_name(number: int, job_overrides: list[str], exclude_keys: list[str], sweep_dir: Path | None = None) -> str:
    """`<job number>_<key>-<value>_...` for the overrides not excluded, i.e. those the sweep varies
    (ClaimRunDir excludes the rest): `3_reduction-16`. A key is its last part unless two of them
    share it; a value loses its brackets and quotes and keeps only the characters `_PASTEABLE` allows, so every path below the job
    dir can be passed unquoted to `checkpoint=` or `resume=`. A job of a sweep started when job
    dirs were plain numbers (`<sweep_dir>/3`) keeps that dir, so the sweep continues where it was."""
    if sweep_dir is not None and (Path(sweep_dir) / str(number) / ".hydra").is_dir():
        return str(number)
    parsed = [o for o in OverridesParser.create().parse_overrides(job_overrides) if o.key_or_group not in exclude_keys]
    last_parts = [o.key_or_group.rsplit(".", 1)[-1] for o in parsed]
    items = []
    for override, short in zip(parsed, last_parts):
        key = short if last_parts.count(short) == 1 else override.key_or_group
        value = _PASTEABLE.sub("-", _BRACKETS.sub("", override.get_value_element_as_str())) or "none"
        items.append(f"{key}-{value}")
    return "_".join([str(number), *sorted(items)])


def shown(path: Path) -> Path:
    """`path` as setrain prints it: relative to the working dir when inside it (shorter to paste)."""
    path = Path(path).absolute()
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
