# Set-up and the two everyday commands: `make demo` (end-to-end demo) and `make test`.
# The CPU build of torch is pinned here, not in pyproject.toml, so GPU users keep their CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ASSETS ?= assets

.PHONY: setup assets demo test lint clean

setup: $(VENV)/.lexica-installed

$(VENV)/.lexica-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

assets: setup
	$(PY) scripts/prepare_assets.py --dest $(ASSETS)

demo: assets
	$(PY) -m harvest --config examples/demo.yaml
	$(PY) -m train --config examples/demo.yaml

test: assets
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check harvest train analysis tests bench scripts

clean:
	rm -rf runs .pytest_cache
