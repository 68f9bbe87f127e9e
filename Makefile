# make demo: train the demo model with capture through a local Ray writer pool (fresh machine OK)
# make test: ruff on mechray/ tests/ benchmarks/ examples/, mypy on mechray/, then the whole
#            test suite (starts its own local Ray, S3 server and Lightning runs)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo lint test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mechray demo --out demo_output

lint: install
	$(BIN)/ruff check mechray tests benchmarks examples
	$(BIN)/mypy

# two pytest workers: most of the suite waits (Ray, Serve, subprocesses), 12 min instead of ~16
TEST_WORKERS ?= 2

test: install lint
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: install
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

bench: install
	$(BIN)/python benchmarks/capture_overhead.py
	$(BIN)/python benchmarks/write_throughput.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
