# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv when missing, install the project into it and make the dataset available.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo
# free disk (GB) a new venv needs: PyTorch from PyPI is a CUDA build on x86_64 (less for a CPU wheel)
VENV_NEED_GB ?= 7

.PHONY: demo test test-all data venv clean

$(VENV)/.installed: pyproject.toml
	@bash scripts/check_disk.sh $(VENV) $(VENV_NEED_GB)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

venv: $(VENV)/.installed

data:
	@bash scripts/get_data.sh

test: venv data
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-all: venv data
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv data
	RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/gmpq run --preset demo --out $(DEMO_OUT)

clean:
	rm -rf runs .pytest_cache
