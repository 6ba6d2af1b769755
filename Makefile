# `make train` and `make test` work on a fresh machine: they create .venv and install into it first.
PYTHON3 ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.setrain-installed

.PHONY: install train test test-fast clean

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

clean:
	rm -rf $(VENV) outputs .pytest_cache
