"""From a sweep to an insight: job dir names that paste, the end-of-sweep summary, and what
TensorBoard's scalars and hparams plugins read from a sweep's event files."""

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

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


def test_keys_that_share_their_last_part_are_named_in_full():
    assert job_dir_name(1, ["model.se.gate=tanh", "head.gate=relu"], []) == "1_head.gate-relu_model.se.gate-tanh"


@pytest.mark.parametrize(
    "override",
    ["model.se.stages=[2,3]", "data.root='/data/my images/a=b,c'", "model=se_resnet20", "optimizer.lr=1e-3", "x=${y}"],
)
def test_every_path_below_a_job_dir_pastes_unquoted_into_a_command(override):
    checkpoint = f"outputs/multirun/2026-11-28/10-00-00/{job_dir_name(3, [override], [])}/checkpoints/best.pt"
    assert pasted(checkpoint) == checkpoint
