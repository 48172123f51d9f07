# Set-up and the two everyday commands: `make demo` (end-to-end demo) and `make test`.
# The CPU build of torch is pinned here, not in pyproject.toml, so GPU users keep their CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ASSETS ?= assets

CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)

.PHONY: setup assets browser peers demo test lint docs clean

setup: $(VENV)/.lexica-installed

$(VENV)/.lexica-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

assets: setup
	$(PY) scripts/prepare_assets.py --dest $(ASSETS)

# Headless Chromium for the feature-browser tests: Debian's package (Playwright's own download
# needs a CDN this machine cannot reach). Installed only when missing, and only as root.
browser:
	@if [ -n "$(CHROMIUM)" ]; then echo "chromium: $(CHROMIUM)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium fonts-dejavu-core >/dev/null; \
	else echo "no chromium found: install it (e.g. apt-get install chromium) or set LEXICA_CHROMIUM"; fi

# SAELens and sparsify in a venv of their own (bench/.venv-peers), never in Lexica's: the benchmarks
# compare against them and tests/test_saelens_real.py checks both directions of the SAELens format.
peers: setup
	$(PY) bench/train.py --setup-peers --only none

demo: assets
	$(VENV)/bin/lexica harvest --config examples/demo.yaml
	$(VENV)/bin/lexica train --config examples/demo.yaml
	$(VENV)/bin/lexica analysis features --config examples/demo.yaml
	$(VENV)/bin/lexica explain --config examples/demo.yaml
	$(VENV)/bin/lexica score --config examples/demo.yaml

test: assets browser
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check lexica harvest train analysis deploy tests bench scripts examples
	$(VENV)/bin/hadolint --failure-threshold warning docker/Dockerfile.cpu docker/Dockerfile.cuda

# docs/configuration.md is generated from the knobs' help text (tests/test_docs.py keeps it equal).
docs: setup
	$(PY) -m lexica.reference > docs/configuration.md

clean:
	rm -rf runs .pytest_cache
