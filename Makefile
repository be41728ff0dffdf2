# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# the project when missing, and skip the install when pyproject.toml has not changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
MT ?= ../shared/data/magnetic-tile
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo default-detector benchmarks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# The whole suite, slow-marked tests included (real data, real S3, Ray clusters). A crash in native
# code (Ray, torch) prints every thread's Python stack instead of a bare "Segmentation fault".
test: setup
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Everything but the slow marker, for quick iteration.
test-fast: setup
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m anomalyfleet.demo

# Rebuild the detector that ships in the package, from Magnetic Tile, with its training report.
default-detector: setup
	$(BIN)/python -m anomalyfleet.default_detector --data-root $(MT)

benchmarks: setup
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/zero_shot.py

clean:
	rm -rf $(VENV) .pytest_cache demo-out
