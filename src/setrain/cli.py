"""Glue between the entry points (train.py, setrain.analyze, ...) and the engine: run dir, user errors.

A user error (SetrainError, or a config that Hydra cannot compose, see config_checks.py) is
printed as one sentence without a traceback; set HYDRA_FULL_ERROR=1 to see the full trace. What a
refused run made in its run dir is removed (rundir.undo_refused_run), so a mistake leaves no
half-made dir behind. In a multirun the failed job is reported and the sweep goes on; the process
then exits non-zero. A multirun started again with the same `hydra.sweep.dir` skips the jobs that
finished and resumes the others from their checkpoints.

SIGTERM or SIGINT at any moment of a training process (engine/signals.py) ends it with 128 + the
signal's number once what was trained is saved: inside a job the trainer saves and stops; one
that came after a job's last training step stops the sweep before its next job.
"""

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from setrain.config_checks import CONFIG_ERRORS, check_values, check_values_before_run, config_error_sentence
from setrain.engine import signals, train
from setrain.engine.distributed import check_restartable_store, launched_rank, restarts_itself
from setrain.engine.rundir import (
    RunDirBefore,
    before_run,
    check_earlier_run,
    job_dir_name,
    lock_run_dir,
    new_run_dir,
    shown,
    swept_keys,
    undo_refused_run,
)
from setrain.engine.signals import RunStopped
from setrain.errors import SetrainError

log = logging.getLogger(__name__)
failed_jobs: list[tuple[int, Path]] = []  # (job number, job dir) of the jobs of a multirun that failed
# What the run dir, or each job dir of a sweep (by name), held before Hydra wrote into it.
run_dirs_before: dict[str, RunDirBefore] = {}
# Read before `run` sets the variable for Hydra: whether the user asked for tracebacks.
SHOW_TRACEBACKS = os.environ.get("HYDRA_FULL_ERROR") == "1"
# hydra.sweep.subdir in configs/train.yaml: a job dir named after what its sweep varies.
OmegaConf.register_new_resolver(
    "setrain.job_dir",
    lambda *, _root_: job_dir_name(
        _root_.hydra.job.num, list(_root_.hydra.overrides.task),
        list(_root_.hydra.job.config.override_dirname.exclude_keys), Path(_root_.hydra.sweep.dir).absolute(),
    ),
    replace=True,
)
OmegaConf.register_new_resolver("setrain.help", lambda *, _root_: help_text(_root_), replace=True)


def run(hydra_main: Callable[[], object]) -> int:
    """Run a `@hydra.main` function and return the process's exit status.

    Hydra prints its own errors over many lines (a missing config lists every option, then the
    search path); with HYDRA_FULL_ERROR=1 it raises them instead, so they arrive here to be said
    in one sentence, or re-raised when the user set the variable.
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except CONFIG_ERRORS as error:
        if SHOW_TRACEBACKS:
            raise
        print(f"setrain: error: {config_error_sentence(error)}", file=sys.stderr)
        return 1
    return exit_status()


class ClaimRunDir(Callback):
    """Checks the config's values (config_checks.check_values), locks the run dir
    (rundir.lock_run_dir) and checks what it holds, all before Hydra makes the run dir or writes
    .hydra/ and train.log into it; listed under hydra.callbacks in configs/train.yaml.

    A sweep locks its sweep dir, then each job its subdirectory; a job dir that holds a run is
    resumed (run_training), so only a single run refuses to start over one.
    """

    def __init__(self):
        self.job_lock = None

    @property
    def claims(self) -> bool:
        """Under torchrun or srun every process starts Hydra: rank 0 claims the run dir for all
        (trainer._join_run_dir). Read when called: a SLURM job unpickles the callback in each task."""
        return launched_rank() == 0

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        signals.record_stop_signals()
        with _exit_on_user_error():
            check_values_before_run(config)
            check_restartable_store()  # here too, so that no process of the group makes its run dir
        if config.resume is None and restarts_itself():  # torchrun --max-restarts, a requeued SLURM job
            config.resume = "auto"
        if self.claims:
            run_dir = Path(config.hydra.run.dir).absolute()
            run_dirs_before[""] = before_run(run_dir)
            with _exit_on_user_error():
                self.run_lock = lock_run_dir(run_dir)
                check_earlier_run(run_dir, config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        signals.record_stop_signals()
        name_jobs_by_swept_keys(config)
        if self.claims:
            sweep_dir = Path(config.hydra.sweep.dir).absolute()
            for job_dir in sweep_dir.iterdir() if sweep_dir.is_dir() else ():
                run_dirs_before[job_dir.name] = before_run(job_dir)
            with _exit_on_user_error():
                self.sweep_lock = lock_run_dir(sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if self.claims and config.hydra.mode == RunMode.MULTIRUN:
            with _exit_on_user_error():
                self.job_lock = lock_run_dir(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if self.job_lock is not None:
            os.close(self.job_lock)
            self.job_lock = None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.claims:
            print(sweep_summary(Path(config.hydra.sweep.dir)))


def help_text(root: DictConfig) -> str:
    """`python train.py --help` (hydra.help.template): the groups with their choices (Hydra's
    $APP_CONFIG_GROUPS), then every key of the chosen files with its value and the comment that
    explains it in the YAML, which Hydra's own help leaves out."""
    configs = next(Path(source.path) for source in root.hydra.runtime.config_sources if source.provider == "main")
    files = [("", configs / f"{root.hydra.job.config_name}.yaml")] + [
        (group.replace("/", ".") + ".", configs / group / f"{choice}.yaml")
        for group, choice in root.hydra.runtime.choices.items()
        if choice is not None and not group.startswith("hydra/")
    ]
    keys = [key for prefix, path in files for key in commented_keys(path, prefix)]
    lines = []
    for key, value, comment in sorted(keys):
        setting = f"  {key}={value}"
        gap = "\n" + " " * 40 if comment and len(setting) > 38 else " " * (40 - len(setting))
        lines.append(f"{setting}{gap}{comment}".rstrip())
    text = "\n".join(lines).replace("$", "$$")  # the template's own placeholders start with $
    return (
        "Train Squeeze-and-Excitation networks: python train.py [group=choice ...] [key=value ...]\n"
        "-m sweeps a key over values (model.se.reduction=4,8,16); README.md has examples.\n\n"
        "Groups (group=choice; experiment=... and debug=tiny override the others):\n$APP_CONFIG_GROUPS\n\n"
        f"Keys of the chosen files (key=default  what it does):\n{text}\n"
    )


def commented_keys(path: Path, prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, value, comment) of each value in a config file: the comment on its line, or
    else the comment lines just above it. Lists (`defaults`) and the `hydra` node are left out."""
    found, parents, above = [], [], []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            above = above + [text.lstrip("# ")] if text else []
            continue
        indent, (key, _, rest) = len(line) - len(line.lstrip()), text.partition(":")
        parents = [(level, name) for level, name in parents if level < indent]
        value, _, comment = rest.partition(" #")
        dotted = ".".join([name for _, name in parents] + [key])
        if not value.strip():
            parents.append((indent, key))
        elif not text.startswith("-") and not dotted.startswith(("hydra.", "defaults.")):
            found.append((prefix + dotted, value.strip(), comment.strip() or " ".join(above)))
        above = []
    return found


def name_jobs_by_swept_keys(config: DictConfig) -> None:
    """Leave the overrides that every job shares out of `hydra.job.override_dirname` and so out of
    the job dir names (setrain.job_dir), by adding them to its exclude_keys. It is added as a Hydra
    override, which each job's config is composed with, so remote launchers (SLURM) name jobs alike."""
    task = list(config.hydra.overrides.task)
    swept = swept_keys(task, config.hydra.sweeper.get("params"))
    shared = {o.key_or_group for o in OverridesParser.create().parse_overrides(task)} - swept
    excluded = sorted(set(config.hydra.job.config.override_dirname.exclude_keys) | shared)
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]")


def sweep_summary(sweep_dir: Path) -> str:
    """What a multirun gives: how many jobs finished, the best one, and the commands to compare them.
    Read from the job dirs, so jobs that another launcher (SLURM) ran count too."""
    jobs = {hydra_dir.parent.name for hydra_dir in sweep_dir.glob("*/.hydra")} | {job_dir.name for _, job_dir in failed_jobs}
    results = {job: json.loads(results.read_text()) for job in sorted(jobs) if (results := sweep_dir / job / "results.json").is_file()}
    lines = [f"Sweep {shown(sweep_dir)}: {len(results)} of {len(jobs)} jobs finished"
             + (f", {len(jobs) - len(results)} failed or unfinished." if len(results) < len(jobs) else ".")]  # fmt: skip
    if results:
        best = max(results, key=lambda job: results[job]["best"]["val_top1"])
        lines.append(f"Best val top-1: {results[best]['best']['val_top1']:.2f}% in {shown(sweep_dir / best)}")
    lines += [
        f"Compare the curves:  tensorboard --logdir {shown(sweep_dir)}",
        f"Table and figures:   python scripts/sweep_report.py {shown(sweep_dir)}",
    ]
    return "\n".join(lines)


@contextmanager
def _exit_on_user_error():
    """Hydra turns a callback's exceptions into warnings: report a refusal here and end the process."""
    try:
        yield
    except SetrainError as error:
        report_user_error(error)
        sys.exit(1)


def run_training(cfg: DictConfig) -> float | None:
    """Train in Hydra's run dir; returns the best val top-1 (a sweeper's objective)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        _stop_on_earlier_signal(f"before job {hydra_cfg.job.num}")
        results = run_dir / "results.json"
        if results.is_file():
            log.info("Job %s finished earlier (%s); skipping it.", hydra_cfg.job.num, results)
            return json.loads(results.read_text())["best"]["val_top1"]
        if cfg.resume is None and (run_dir / "checkpoints" / "last.pt").is_file():
            cfg.resume = "auto"
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # a single run's values were checked by ClaimRunDir
            check_values(cfg)
            return train(cfg, run_dir)["best"]["val_top1"]
        best = train(cfg, run_dir)["best"]["val_top1"]
        log.info("Curves: tensorboard --logdir %s", shown(run_dir))
        log.info("Evaluate: python -m setrain.evaluate checkpoint=%s", shown(run_dir / "checkpoints" / "best.pt"))
        return best
    except RunStopped as stopped:
        log.info("%s", stopped)
        if stopped.requeue:
            signals.requeue_job(launched_rank())
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.info("Run the same command again to continue the sweep in %s.", hydra_cfg.sweep.dir)
        sys.exit(stopped.exit_code)
    except SetrainError as error:
        report_user_error(error)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if launched_rank() == 0:  # under torchrun or srun, rank 0 made the run dir (ClaimRunDir)
            # A job dir that was not there when the sweep started was made by this job.
            undo_refused_run(run_dirs_before.get(run_dir.name if multirun else "") or new_run_dir(run_dir))
        if not multirun:
            sys.exit(1)
        failed_jobs.append((hydra_cfg.job.num, run_dir))
        return None


def report_user_error(error: SetrainError) -> None:
    """Print the error's sentence as one line, or its traceback when HYDRA_FULL_ERROR=1 asks for it."""
    if SHOW_TRACEBACKS:
        traceback.print_exception(error)
    else:
        print(f"setrain: error: {error}", file=sys.stderr)


def run_command(command: Callable, cfg) -> None:
    """Run `command(cfg)`; a user error ends it with one line and exit code 1."""
    try:
        command(cfg)
    except SetrainError as error:
        report_user_error(error)
        sys.exit(1)


def _stop_on_earlier_signal(where: str) -> None:
    """End the process as stopped if it got SIGTERM or SIGINT where no training step saw it."""
    name = signals.received()
    if name is not None:
        log.info("Stopped by %s %s; what was trained is saved. Run the same command again to continue.", name, where)
        sys.exit(signals.exit_code(name))


def exit_status() -> int:
    """128 + signal after a stop signal; non-zero after a multirun in which some job failed, listing those jobs."""
    _stop_on_earlier_signal("after training ended")
    if failed_jobs:
        print(f"setrain: {len(failed_jobs)} job(s) failed: {', '.join(f'{number} ({shown(job_dir)})' for number, job_dir in failed_jobs)}", file=sys.stderr)
        return 1
    return 0
