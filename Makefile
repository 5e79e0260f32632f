# Two entry points for a fresh clone: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv on first use. torch is pinned first so pip takes the CPU wheel where one is
# provided locally; on a GPU machine the same pin resolves to the CUDA build from the index.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,nnsight,lens,figures]"
	touch $@

.PHONY: setup demo test lint
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m moe_interp.demo_job

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check moe_interp tests benchmarks notebooks experiments
