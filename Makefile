# `make train` and `make test` work on a fresh machine: they create .venv and install into it first.
PYTHON3 ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.setrain-installed

.PHONY: install train test test-fast gpu-deps clean

install: $(INSTALLED)

# constraints.txt pins the tested torch/torchvision pair (see DEVELOPERS.md).
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PYTHON3) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[dev,analysis,export]'
	touch $@

train: install
	$(PYTHON) train.py $(ARGS)

test: install
	$(PYTHON) -m pytest $(ARGS)

# A test process per core (pytest-xdist), each with one torch thread; the tests that read a shared
# run in one of them (tests/conftest.py). ARGS="-n 0" runs them in this process.
test-fast: install
	$(PYTHON) -m pytest -m "not slow" -n auto --dist loadgroup $(ARGS)

# The pure-Python packages scripts/gpu_check.sh needs that a GPU machine with torch may lack (Hydra,
# OmegaConf, ANTLR's runtime; pytest for the kernel check), copied from .venv into .gpu_deps, the
# folder the script puts on PYTHONPATH and the device tool's `carry` takes.
GPU_DEPS := hydra omegaconf antlr4 pytest _pytest pluggy iniconfig packaging
GPU_DEPS_DIR ?= .gpu_deps
gpu-deps: install
	rm -rf $(GPU_DEPS_DIR) && mkdir -p $(GPU_DEPS_DIR)
	$(PYTHON) -c 'import importlib, pathlib, shutil, sys; [shutil.copytree(pathlib.Path(importlib.import_module(name).__file__).parent, pathlib.Path(sys.argv[1], name), ignore=shutil.ignore_patterns("__pycache__")) for name in sys.argv[2:]]' $(GPU_DEPS_DIR) $(GPU_DEPS)
	du -sh $(GPU_DEPS_DIR)

clean:
	rm -rf $(VENV) outputs .pytest_cache
