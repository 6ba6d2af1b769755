"""Each entry module imports on its own, first in a fresh interpreter: a circular import shows
only in the order a command triggers it, which an in-process test suite has long since passed."""

import subprocess
import sys

import pytest

ENTRY_MODULES = [
    "setrain.cli",  # train.py
    "setrain.config_checks",
    "setrain.engine",
    "setrain.evaluate",
    "setrain.predict",
    "setrain.analyze",
    "setrain.export",
    "setrain",  # setrain.train(...)
]


@pytest.mark.slow  # a few seconds each, in a subprocess
@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_module_imports_first_in_a_fresh_interpreter(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
