# voxlake: two commands on a fresh machine.
#   make demo   creates .venv, generates sample DICOM, ingests it with a local Dask cluster,
#               prints a catalog summary and trains the 3D CNN on the streamed volumes.
#   make test   creates .venv and runs the whole test suite (what CI runs).
#   make test-latest   the suite again under the newest Python (3.13: zarr 3.2+, numpy 2.3+)
#               in .venv-latest, without the train extra (CI runs it too).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first, pinned, so no later resolve pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= train,jpeg,s3,fast,dev,bench
PYTEST_ARGS ?=
# The second interpreter: its own releases of every dependency, no torch (no CPU wheel of
# it lies on this disk for 3.13), so tests/training is not collected there.
PYTHON_LATEST ?= python3.13
LATEST_VENV ?= .venv-latest
LATEST_EXTRAS ?= jpeg,s3,pacs,mr,dev

.PHONY: install demo test test-latest lint typecheck docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(VENV)/bin/voxlake demo --out demo-out

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

$(LATEST_VENV)/.installed: pyproject.toml
	$(PYTHON_LATEST) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet -e ".[$(LATEST_EXTRAS)]"
	touch $@

test-latest: $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

docs: install
	$(VENV)/bin/voxlake catalog schema-doc --out docs/catalog-schema.md

clean:
	rm -rf demo-out .pytest_cache .mypy_cache .ruff_cache
