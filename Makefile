# Developer entry points. `make demo`, `make test` and `make test-all` each do their own set-up in .venv.
# `make test` is the everyday suite (tests marked `slow` left out: big models and whole-process
# scenarios; under 5 minutes on 2 cores); `make test-all` is everything, slow tests included, and
# is what CI runs.
#
# CONSTRAINTS pins the CPU build of torch so that set-up on a machine without a GPU never
# downloads several GB of CUDA wheels. It binds this dev environment only; a user's
# `pip install 'cvt-deploy[torch]'` is unpinned. `make CONSTRAINTS= test` drops it.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
PY := $(VENV)/bin/python
# Test processes (pytest-xdist): each takes whole test files, so a file's module fixtures
# (one Triton server, one export) are made once. `make PYTEST_WORKERS=0 test` runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.installed

.PHONY: demo test test-all typecheck venv clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) -e '.[dev]'
	# tensorrt-stubs requires the real tensorrt wheel (NVIDIA's index only): stubs alone.
	$(PY) -m pip install -q --no-deps 'tensorrt-stubs>=10.0'
	$(PY) tools/repair_trt_stubs.py build/typestubs
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cvt-demo

typecheck: $(STAMP)
	$(PY) -m mypy

test: $(STAMP)
	$(PY) -m mypy
	$(PYTEST) -m "not slow"

test-all: $(STAMP)
	$(PY) -m mypy
	$(PYTEST)

clean:
	rm -rf $(VENV) build
