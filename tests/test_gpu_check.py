"""scripts/gpu_check.sh's set-up: what the GPU machine lacks travels as copies made by `make gpu-deps`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_gpu_deps_copies_importable_hydra_omegaconf_and_pytest(tmp_path):
    deps = tmp_path / "deps"
    # From the Python running the tests, without installing .venv (`-o install`).
    make = ["make", "-o", "install", "gpu-deps", f"PYTHON={sys.executable}", f"GPU_DEPS_DIR={deps}"]
    made = subprocess.run(make, cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert not list(deps.rglob("__pycache__"))  # before the probe's imports may write some
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import hydra, omegaconf, antlr4, pytest; "
        "from hydra import compose, initialize_config_dir; "
        "print(*(m.__file__ for m in (hydra, omegaconf, antlr4, pytest)), sep='\\n')"
    )
    imported = subprocess.run([sys.executable, "-c", probe, str(deps)], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    assert all(Path(path).is_relative_to(deps) for path in imported.stdout.split())
