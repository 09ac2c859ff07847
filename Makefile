# The README's two commands: `make demo` and `make test`. Both build .venv on first use
# (and again whenever pyproject.toml changes), so a fresh machine needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnsurgery demo --out bnsurgery-demo

# The suite CI runs: every test (set-up plus tests well under 10 minutes on 2 cores).
test: $(STAMP)
	$(PY) -m pytest

# Kept as a name for `make test`, which is now complete.
test-all: test

# The inner loop: one model per structural family, stop at the first failure.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -x

lint: $(STAMP)
	$(PY) -m ruff check bnsurgery tests examples benchmarks
	$(PY) -m mypy bnsurgery

bench: $(STAMP)
	$(PY) benchmarks/bn_kernel.py
	$(PY) benchmarks/fuse_latency.py
	$(PY) benchmarks/fuse_vs_fx.py
	$(PY) benchmarks/export_latency.py
	$(PY) benchmarks/sync_overhead.py
	$(PY) benchmarks/reparam_latency.py
	$(PY) benchmarks/recalibrate_throughput.py

# Everything the targets above make: the venv, build and install metadata, tool caches, demo
# output and bytecode. Files you wrote yourself (exports, reports) are left alone.
clean:
	rm -rf $(VENV) build dist bnsurgery-demo .pytest_cache .ruff_cache .mypy_cache .hypothesis
	rm -rf *.egg-info bnsurgery/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
