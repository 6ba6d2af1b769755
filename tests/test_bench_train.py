"""scripts/bench_train.py --tails: the CPU's SE cost taken apart stage by stage (its figures are timings,
so the tests check what it finds and the arithmetic of its table, not the values)."""

import pytest

from conftest import REPO_ROOT, assert_user_error, run_program

SCRIPT = str(REPO_ROOT / "scripts" / "bench_train.py")


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of the Markdown table's rows, without its header and separator."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip(" |").split("|")] for line in lines[1:]]


def test_tails_times_each_stage_of_the_real_model_and_sums_them_per_step():
    result = run_program(
        SCRIPT, "--tails", "--groups", "cifar", "--rounds", "1", "--batch-size", "2", "--quiet-wait", "0",
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    *stages, total = table_rows(result.stdout)
    # the CIFAR SENet-18 at 32 px: four stages of two blocks, found by running the model
    assert [cells[:2] for cells in stages] == [
        ["64 x 32 x 32", "2"], ["128 x 16 x 16", "2"], ["256 x 8 x 8", "2"], ["512 x 4 x 4", "2"]
    ]  # fmt: skip
    sums = [0.0, 0.0, 0.0]
    for cells in stages:
        plain, fused, unfused, fcs, *per_step = (float(cell) for cell in cells[2:])
        assert min(plain, fused, unfused, fcs) > 0
        expected = [2 * (fused - plain), 2 * (unfused - plain), 2 * fcs]
        assert per_step == pytest.approx(expected, abs=0.02)  # cells rounded to 0.01 ms
        sums = [s + value for s, value in zip(sums, per_step)]
    step_ms = float(total[0].split("step of ")[1].split(" ms")[0])
    for cell, expected in zip(total[-3:], sums, strict=True):
        milliseconds, percent = cell.split(" (")
        assert float(milliseconds) == pytest.approx(expected, abs=0.1)
        assert float(percent.rstrip("%)")) == pytest.approx(100 * float(milliseconds) / step_ms, abs=0.1)


def test_tails_refuses_the_gpu_in_one_sentence():
    result = run_program(SCRIPT, "--tails", "--device", "cuda", cwd=REPO_ROOT)
    assert_user_error(result, "--tails and --profile measure on the CPU; leave out --device cuda.")
