# Two commands do all the set-up on a fresh machine:
#   make bench  -- builds .venv with what the bench needs (.[vision,train]) if needed, then runs `finereg bench`
#   make test   -- builds .venv with the full development set (.[dev]) if needed, then runs the test suite
# make demo is a single short fine-tuning run; make bench-perf runs the speed benchmarks.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
# torch's build: the CPU one where no GPU is present (no nvidia-smi), pip's default (CUDA on Linux) otherwise;
# choose with `make TORCH=default ...` or `make TORCH=cpu ...` when .venv is first built (tools/install_torch.py)
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),default,cpu)
PIN     = -c $(VENV)/torch-constraints.txt

.PHONY: bench demo test lint bench-perf clean

$(VENV)/.torch:
	@echo "set-up: creating the virtual environment $(VENV) and updating its pip"
	test -x $(PY) || { $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip; }
	@echo "set-up: installing torch and torchvision ($(TORCH) build)"
	$(PY) tools/install_torch.py $(TORCH) $(VENV)/torch-constraints.txt
	touch $@

# what the bench needs: the engine and the vision models
$(VENV)/.installed-bench: pyproject.toml $(VENV)/.torch
	@echo "set-up: installing finereg with the bench's packages, .[vision,train] (timm, matplotlib, scipy, ...)"
	$(PY) -m pip install -q $(PIN) -e ".[vision,train]"
	touch $@

# the test suite's full set (also JAX, Keras, Lightning, transformers); it includes the bench's
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	@echo "set-up: installing finereg with the test suite's packages, .[dev] (also JAX, Keras, Lightning, transformers)"
	$(PY) -m pip install -q $(PIN) -e ".[dev]"
	touch $@ $(VENV)/.installed-bench

bench: $(VENV)/.installed-bench
	$(PY) -m finereg bench

demo: $(VENV)/.installed-bench
	$(PY) -m finereg demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-perf: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
