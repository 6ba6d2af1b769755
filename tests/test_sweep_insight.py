"""From a sweep to an insight: job dir names that paste, the end-of-sweep summary, and what
TensorBoard's scalars and hparams plugins read from a sweep's event files."""

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from conftest import TINY, compose_config, run_cli, run_module
from setrain.engine.curves import hparams_of
from setrain.engine.rundir import job_dir_name, swept_keys


def pasted(path: str) -> str:
    """`path` as Hydra's override parser reads `checkpoint=<path>` typed without quotes."""
    return OverridesParser.create().parse_override(f"checkpoint={path}").value()


def test_a_job_dir_is_named_after_the_swept_keys_only():
    task = ["debug=tiny", "model.se.reduction=4,8,16", "trainer.epochs=1", "optimizer.lr=choice(0.1,-1e-3)"]
    swept = swept_keys(task, {"model.se.stages": "null,[4],[4,5]"})
    assert swept == {"model.se.reduction", "optimizer.lr", "model.se.stages"}
    shared = ["debug", "trainer.epochs", "resume"]
    job = ["debug=tiny", "model.se.reduction=16", "trainer.epochs=1", "optimizer.lr=-1e-3", "model.se.stages=[4,5]"]
    assert job_dir_name(7, job, shared) == "7_lr--0.001_reduction-16_stages-4-5"
    assert job_dir_name(0, ["debug=tiny"], shared) == "0"


def test_a_job_of_a_sweep_from_before_the_names_keeps_its_numbered_dir(tmp_path):
    (tmp_path / "3" / ".hydra").mkdir(parents=True)
    assert job_dir_name(3, ["model.se.reduction=16"], [], tmp_path) == "3"
    assert job_dir_name(4, ["model.se.reduction=32"], [], tmp_path) == "4_reduction-32"


def test_keys_that_share_their_last_part_are_named_in_full():
    assert job_dir_name(1, ["model.se.gate=tanh", "head.gate=relu"], []) == "1_head.gate-relu_model.se.gate-tanh"


@pytest.mark.parametrize(
    "override",
    ["model.se.stages=[2,3]", "data.root='/data/my images/a=b,c'", "model=se_resnet20", "optimizer.lr=1e-3", "x=${y}"],
)
def test_every_path_below_a_job_dir_pastes_unquoted_into_a_command(override):
    checkpoint = f"outputs/multirun/2026-11-28/10-00-00/{job_dir_name(3, [override], [])}/checkpoints/best.pt"
    assert pasted(checkpoint) == checkpoint


def test_hparams_are_the_swept_keys_then_the_command_line_then_model_and_data_with_their_types():
    overrides = [*TINY, "optimizer=adam", "model.se.reduction=4", "trainer.epochs=3", "resume=auto"]
    cfg = compose_config(*overrides)
    hparams = hparams_of(cfg, overrides, swept={"model.se.reduction"})
    assert list(hparams.items()) == [
        ("model.se.reduction", 4),  # an int, as in the config: TensorBoard gets a number
        ("debug", "tiny"),  # a group's choice
        ("optimizer", "adam"),
        ("trainer.epochs", 3),
        ("model.name", "se_resnet20"),
        ("data.name", "shapes"),
    ]  # resume is where a run continues from, not a setting


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real two-job reduction sweep of tiny runs, its output and its folder."""
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", *TINY, "trainer.epochs=1", "model.se.reduction=4,8", "optimizer.lr=0.05", "hydra.sweep.dir=r_sweep", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, result.stdout


@pytest.mark.slow
def test_a_sweep_ends_with_one_summary_whose_paths_paste_into_the_next_command(sweep):
    cwd, stdout = sweep
    assert sorted(path.name for path in (cwd / "r_sweep").glob("*_*")) == ["0_reduction-4", "1_reduction-8"]
    summary = stdout[stdout.index("Sweep r_sweep:"):].splitlines()
    assert summary[0] == "Sweep r_sweep: 2 of 2 jobs finished."
    best_job = summary[1].split(" in ")[1]
    assert summary[2:] == [
        "Compare the curves:  tensorboard --logdir r_sweep",
        "Table and figures:   python scripts/sweep_report.py r_sweep",
    ]
    assert stdout.count(best_job) == 2  # once where the job starts, once in the summary
    evaluated = run_module("setrain.evaluate", f"checkpoint={best_job}", cwd=cwd)  # the run dir: its best.pt
    assert evaluated.returncode == 0, evaluated.stderr
    assert (cwd / best_job / "evaluation" / "evaluation.json").is_file()
    assert compose_config(*TINY, f"resume={best_job}/checkpoints/last.pt").resume == f"{best_job}/checkpoints/last.pt"


@pytest.mark.slow
def test_tensorboard_reads_the_sweep_as_one_table_led_by_the_swept_key(sweep):
    """As TensorBoard's hparams plugin reads the event files: the experiment's columns with their
    types, each session's values, and a curve behind every metric column."""
    runs = EventMultiplexer().AddRunsFromDirectory(str(sweep[0] / "r_sweep")).Reload()
    contents = runs.PluginRunToTagToContent("hparams")
    assert sorted(contents) == ["0_reduction-4/tb", "1_reduction-8/tb"]
    experiment = HParamsPluginData.FromString(contents["0_reduction-4/tb"]["_hparams_/experiment"]).experiment
    columns = [(info.name, api_pb2.DataType.Name(info.type), info.differs) for info in experiment.hparam_infos]
    assert columns == [
        ("model.se.reduction", "DATA_TYPE_FLOAT64", True),  # the swept key first, a number
        ("debug", "DATA_TYPE_STRING", False),
        ("optimizer.lr", "DATA_TYPE_FLOAT64", False),
        ("trainer.epochs", "DATA_TYPE_FLOAT64", False),
        ("model.name", "DATA_TYPE_STRING", False),
        ("data.name", "DATA_TYPE_STRING", False),
    ]
    for session, reduction in (("0_reduction-4/tb", 4), ("1_reduction-8/tb", 8)):
        values = HParamsPluginData.FromString(contents[session]["_hparams_/session_start_info"]).session_start_info.hparams
        assert values["model.se.reduction"].WhichOneof("kind") == "number_value"
        assert values["model.se.reduction"].number_value == reduction and values["trainer.epochs"].number_value == 1
        assert values["model.name"].string_value == "se_resnet20" and values["debug"].string_value == "tiny"
        end = HParamsPluginData.FromString(contents[session]["_hparams_/session_end_info"]).session_end_info
        assert end.status == api_pb2.STATUS_SUCCESS
        for metric in experiment.metric_infos:
            assert metric.name.tag in runs.Runs()[f"{session}/{metric.name.group}"]["tensors"]  # scalars, as TensorBoard stores them
    tags = {run: set(found["tensors"]) for run, found in runs.Runs().items()}
    assert {"epoch/loss", "epoch/top1"} <= tags["0_reduction-4/tb/train"] & tags["1_reduction-8/tb/val"]
    curves = {tag for run, found in tags.items() if not run.endswith("/tb") for tag in found}  # tb/ holds gates, images
    assert all(tag.startswith(("epoch/", "step/", "speed/")) for tag in curves), curves


@pytest.mark.slow
def test_help_lists_the_groups_their_choices_and_each_key_with_its_comment(tmp_path):
    result = run_cli("model=se_resnet50", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("model: ") and "se_resnet50" in line and "senet154" in line for line in lines)
    assert any(line.startswith("optimizer: adam, adamw, sgd") for line in lines)
    assert "  model.se.reduction=16                 r: hidden width C//r of the excitation" in lines
    assert "  model.name=se_resnet50" in lines  # the chosen model's file
    assert not any(line.lstrip().startswith(("hydra.", "run.dir", "callbacks")) for line in lines)
