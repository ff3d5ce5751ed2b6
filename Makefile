# Two commands do all the set-up on a fresh machine:
#   make bench  -- builds .venv if needed, then runs the main job (`finereg bench`) on its built-in defaults
#   make test   -- builds .venv if needed, then runs the test suite
# make demo is a single short fine-tuning run; make bench-perf runs the speed benchmarks.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python

.PHONY: bench demo test lint bench-perf clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

bench: $(VENV)/.installed
	$(PY) -m finereg bench

demo: $(VENV)/.installed
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
