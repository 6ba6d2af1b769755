"""Summarise a multirun: a Markdown table of its jobs, a plot of a metric against the swept key
and the val top-1 curves of every job in one chart.

    python scripts/sweep_report.py outputs/multirun/2026-11-23/10-00-00
    python scripts/sweep_report.py <sweep dir> --x model.se.reduction --metric best.val_top1

Reads each job's results.json (written by the trainer when a run ends), metrics.csv (a row per
epoch) and the overrides Hydra saved in its .hydra/overrides.yaml, and writes into the sweep dir
sweep_report.md, sweep_report.png and sweep_curves.png (figures for a slide: 160 dpi, labels in
words). A job without results.json failed or has not finished; it is listed as such. The swept
key, the plot's x axis, is the one override whose value differs between jobs; where several do
(an Optuna sweep), --x picks one, or the plot shows the metric by job number, the optimisation
history.
"""

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from setrain.cli import run_command
from setrain.errors import SetrainError
from setrain.figures import pyplot

COLUMNS = {  # table column -> key path in results.json
    "best val top-1 (%)": "best.val_top1",
    "best val top-5 (%)": "best.val_top5",
    "best epoch": "best.epoch",
    "final val top-1 (%)": "final.val_top1",
    "epochs": "epochs",
}
LABELS = {  # an axis label in words for a key of the config or of results.json; others show the key
    "model.se.reduction": "SE reduction ratio r",
    "model.se.gate": "SE gate",
    "model.se.squeeze": "SE squeeze",
    "model.se.placement": "SE placement",
    "model.se.stages": "SE stages",
    "optimizer.lr": "learning rate",
    **{path: label for label, path in COLUMNS.items()},
    "final.val_loss": "final val loss",
}


@dataclass
class Job:
    number: int
    directory: Path
    overrides: dict[str, str]
    """key -> value as written on the command line ("model.se.reduction" -> "16")."""
    results: dict | None
    """results.json; None while the job has not finished, or when it failed."""

    def value(self, key: str) -> float | str:
        """The override's value, as a number where it is one, so that sweeps sort by size."""
        text = self.overrides.get(key, "(default)")
        try:
            return float(text)
        except ValueError:
            return text

    def metric(self, path: str) -> float | None:
        found = self.results
        for part in path.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        return found


def read_jobs(sweep_dir: Path) -> list[Job]:
    """Every job Hydra started in `sweep_dir`, finished or not, by job number."""
    if not sweep_dir.is_dir():
        raise SetrainError(
            f"Sweep folder {sweep_dir} does not exist; pass the folder a multirun wrote, e.g. "
            "outputs/multirun/<date>/<time>."
        )
    parser = OverridesParser.create()
    jobs = [read_job(hydra_dir, parser) for hydra_dir in sweep_dir.glob("**/.hydra")]
    if not jobs:
        raise SetrainError(
            f"{sweep_dir} holds no Hydra jobs (no <job>/.hydra/ folder); pass the folder a multirun "
            "wrote, e.g. outputs/multirun/<date>/<time>."
        )
    return sorted(jobs, key=lambda job: job.number)


def read_job(hydra_dir: Path, parser: OverridesParser) -> Job:
    """The job whose .hydra/ is `hydra_dir`; a single run (no job number: not started by -m) or
    files that do not parse are refused, naming the folder."""
    job_dir, results = hydra_dir.parent, hydra_dir.parent / "results.json"
    try:
        job = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job
        if OmegaConf.is_missing(job, "num"):
            raise SetrainError(
                f"{job_dir} is a single run, not a job of a multirun; pass the folder a multirun wrote, "
                "e.g. outputs/multirun/<date>/<time> (a single run's results are in its results.json)."
            )
        overrides = parser.parse_overrides(list(OmegaConf.load(hydra_dir / "overrides.yaml")))
        return Job(
            number=job.num,
            directory=job_dir,
            overrides={o.key_or_group: o.get_value_element_as_str() for o in overrides},
            results=json.loads(results.read_text()) if results.is_file() else None,
        )
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException, HydraException) as error:
        raise SetrainError(
            f"Could not read the job in {job_dir} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "move the folder out of the sweep folder, or restore its .hydra/ and results.json."
        ) from error


def varying_keys(jobs: list[Job]) -> list[str]:
    keys = sorted({key for job in jobs for key in job.overrides})
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def sort_key(value: float | str) -> tuple:
    """Numbers before text, each in its own order."""
    return (0, value, "") if isinstance(value, float) else (1, 0, value)


def run_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def table_order(job: Job, x_key: str | None, metric: str) -> tuple:
    """Finished jobs first: by the swept key's value, or with no swept key, highest metric first."""
    if x_key:
        return (job.results is None, sort_key(job.value(x_key)), job.number)
    score = job.metric(metric)
    return (score is None, -(score or 0), job.number)


def markdown(jobs: list[Job], varying: list[str], metric: str, sweep_dir: Path) -> str:
    """A table row per job with the overrides that vary; those shared by all are listed once above."""
    columns = dict(COLUMNS)
    if metric not in columns.values():
        columns[metric] = metric
    lines = [
        "| job | overrides | parameters | " + " | ".join(columns) + " | run time |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for job in jobs:
        overrides = " ".join(f"{key}={job.overrides.get(key, '(default)')}" for key in varying)
        if job.results is None:
            cells = ["failed or unfinished (no results.json)"] + [""] * (len(columns) + 1)
        else:
            numbers = [job.metric(path) for path in columns.values()]
            cells = [
                f"{job.results['params']:,}",
                *("n/a" if n is None else f"{n:.2f}" if isinstance(n, float) else str(n) for n in numbers),
                run_time(job.results["run_time_s"]),
            ]
        lines.append(f"| {job.number} | {overrides or '(none)'} | " + " | ".join(cells) + " |")

    common = sorted(f"`{key}={value}`" for key, value in jobs[0].overrides.items() if key not in varying)
    finished = [job for job in jobs if job.metric(metric) is not None]
    header = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(jobs)} jobs, {len(finished)} finished; all ran with {' '.join(common) or 'the defaults'}.",
    ]
    if finished:
        best = max(finished, key=lambda job: job.metric(metric))
        header.append(f"Highest {metric}: {best.metric(metric):.2f}, job {best.number}.")
    return "\n".join(header + [""] + lines) + "\n"


def label(key: str) -> str:
    return LABELS.get(key, key)


def plot(plt, jobs: list[Job], x_key: str | None, metric: str, title: str):
    """`metric` of each finished job against `x_key` (or the job number), the mean per value as a
    line, and the exact parameter count on a second axis: the accuracy-versus-cost trade-off."""
    finished = [job for job in jobs if job.metric(metric) is not None]
    xs = [job.value(x_key) if x_key else float(job.number) for job in finished]
    scores = [job.metric(metric) for job in finished]
    values = sorted(set(xs), key=sort_key)
    numeric = all(isinstance(x, float) for x in values)
    position = (lambda x: x) if numeric else values.index  # text values: one slot each
    means = [statistics.mean(score for x, score in zip(xs, scores) if x == value) for value in values]

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    ax.plot([position(x) for x in xs], scores, "o", markersize=7, label=label(metric))
    ax.plot([position(value) for value in values], means, "-", color="C0")
    if numeric and x_key and min(values) > 0 and all(math.log2(value).is_integer() for value in values) and len(values) > 2:
        ax.set_xscale("log", base=2)  # r = 2, 4, 8, 16: equal steps
    elif numeric and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")  # other geometric sweeps: learning rates
    if len(values) <= 12:
        ax.set_xticks([position(value) for value in values], [f"{value:g}" if numeric else value for value in values])
        ax.minorticks_off()
    ax.set_xlabel(label(x_key) if x_key else "job number")
    ax.set_ylabel(label(metric))
    params = ax.twinx()
    counts = [job.results["params"] for job in finished]
    params.plot([position(x) for x in xs], counts, "s", color="grey", alpha=0.6, label="parameters")
    for x, count in zip(xs, counts):
        params.annotate(f"{count:,}", (position(x), count), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize="small", color="dimgrey")  # fmt: skip
    params.set_ylabel("parameters", color="dimgrey")
    params.yaxis.set_major_formatter(lambda count, _: f"{count:,.0f}")
    params.margins(y=0.25)
    params.grid(False)
    ax.margins(x=0.1)
    ax.legend(handles=ax.lines[:1] + params.lines, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def epoch_curves(job: Job) -> tuple[list[int], list[float]]:
    """The job's val top-1 per epoch from its metrics.csv (none where it has no such file)."""
    try:
        with open(job.directory / "metrics.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        return [int(row["epoch"]) for row in rows], [float(row["val_top1"]) for row in rows]
    except (OSError, KeyError, ValueError, csv.Error):
        return [], []


def plot_curves(plt, jobs: list[Job], x_key: str | None, title: str):
    """Val top-1 per epoch of every job in one chart, a line per job named by its swept value;
    None where no job has a metrics.csv."""
    curves = [(job, *epoch_curves(job)) for job in jobs]
    curves = [curve for curve in curves if curve[1]]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for job, epochs, top1 in curves:
        name = f"{label(x_key)} = {job.overrides.get(x_key, '(default)')}" if x_key else f"job {job.number}"
        ax.plot(epochs, top1, "o-", markersize=4, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def report(args: argparse.Namespace) -> None:
    """Write the sweep's table and plot."""
    plt = pyplot("sweep_report.py")
    sweep_dir = Path(args.sweep_dir)
    jobs = read_jobs(sweep_dir)
    varying = varying_keys(jobs)
    keys = sorted({key for job in jobs for key in job.overrides})
    if args.x is not None and args.x not in keys:
        raise SetrainError(
            f"--x {args.x} is not an override of any job in {sweep_dir}; choose one of: "
            f"{', '.join(keys) or 'none (the jobs have no overrides)'}."
        )
    finished = [job for job in jobs if job.results is not None]
    if finished and all(job.metric(args.metric) is None for job in finished):
        raise SetrainError(
            f"No results.json in {sweep_dir} has {args.metric}; pass --metric <key path in "
            "results.json>, e.g. best.val_top1 or final.val_loss."
        )
    x_key = args.x or (varying[0] if len(varying) == 1 else None)
    jobs.sort(key=lambda job: table_order(job, x_key, args.metric))

    table = markdown(jobs, varying, args.metric, sweep_dir)
    (sweep_dir / "sweep_report.md").write_text(table)
    print(table)
    if not finished:
        print(f"Written: {sweep_dir / 'sweep_report.md'}; no plot, as no job has finished.")
        return
    title = f"{label(args.metric)} by {label(x_key) if x_key else 'job'}"
    if x_key is None and len(varying) > 1:
        title += f"\n(several keys vary: {', '.join(varying)}; pick one with --x)"
    plot(plt, jobs, x_key, args.metric, title).savefig(sweep_dir / "sweep_report.png")
    written = [sweep_dir / "sweep_report.md", sweep_dir / "sweep_report.png"]
    curves = plot_curves(plt, jobs, x_key, f"val top-1 per epoch, sweep {sweep_dir.resolve().name}")
    if curves is not None:
        curves.savefig(sweep_dir / "sweep_curves.png")
        written.append(sweep_dir / "sweep_curves.png")
    print(f"Written: {', '.join(map(str, written))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="the folder a multirun wrote (hydra.sweep.dir)")
    parser.add_argument("--x", help="the override on the plot's x axis (default: the one that varies)")
    parser.add_argument(
        "--metric", default="best.val_top1", help="a key path in results.json (default: %(default)s)"
    )
    run_command(report, parser.parse_args())


if __name__ == "__main__":
    main()
