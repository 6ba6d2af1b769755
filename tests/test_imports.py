"""The import graph: layered, without cycles (read from the source), and each entry module
importing on its own, first in a fresh interpreter: a circular import shows only in the order a
command triggers it, which an in-process test suite has long since passed."""

import ast
import subprocess
import sys
from pathlib import Path

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


# The layers, bottom up: a module imports from its own layer and those below, never above.
LAYERS = {"errors": 0, "files": 0, "models": 1, "data": 1, "engine": 2}  # any other module: 3, the commands
SOURCE = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The setrain modules `path` imports when it is imported (module level), without the
    packages that hold it (importing a sibling runs its package's __init__, as Python does)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    name = _module_name(path)
    return {
        module for module in found & modules
        if module != name and not name.startswith(module + ".") and module != "setrain"
    }  # fmt: skip


def _layer(module: str) -> int:
    return LAYERS.get(module.split(".")[1], 3) if "." in module else 3


def test_modules_import_only_their_layer_and_below_without_cycles():
    paths = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}
    upward = [f"{name} -> {target}" for name, targets in graph.items() for target in targets if _layer(target) > _layer(name)]
    sideways = [
        f"{name} -> {target}" for name, targets in graph.items() for target in targets
        if {name.split(".")[1:2][0] if "." in name else "", target.split(".")[1]} == {"models", "data"}
    ]  # fmt: skip
    assert not upward and not sideways, upward + sideways

    def cycle_from(start: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for target in sorted(graph[start]):
            if target in seen:
                return (*seen[seen.index(target):], target)
            if found := cycle_from(target, (*seen, target)):
                return found
        return None

    cycles = [cycle for name in graph if (cycle := cycle_from(name, (name,)))]
    assert not cycles, " -> ".join(cycles[0])
