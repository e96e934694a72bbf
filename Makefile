# Token Kiosk: everything runs from a local virtualenv that `make` creates on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install run test cov lint fmt typecheck check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e . --group dev
	touch $(STAMP)

keys.db:
	install -m 600 keys.db.sample keys.db  # readable by its owner only: it holds key digests

run: $(STAMP) keys.db
	$(BIN)/gateway serve --host $(HOST) --port $(PORT)

# The suite runs under coverage with a 90% floor (pyproject's [tool.coverage.report]), on
# two pytest-xdist workers per CPU core, at most 4 (TEST_WORKERS=0: in one process; see
# docs/development.md): much of it waits on real processes, which a second worker fills. Compiled modules are cached (in __pycache__) even where
# PYTHONDONTWRITEBYTECODE is set: the suite starts `gateway serve` about sixty times, and
# each would compile the package again (about 10 s of a run on two cores).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n * 2 < 4 ? n * 2 : 4 )))
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal

test: $(STAMP)
	$(PYTEST) --cov --cov-report=term:skip-covered

cov: $(STAMP)
	$(PYTEST) --cov --cov-report=term --cov-report=html

fmt: $(STAMP)
	$(BIN)/ruff format gateway tests
	$(BIN)/ruff check --fix gateway tests

typecheck: $(STAMP)
	$(BIN)/mypy

lint: $(STAMP)
	$(BIN)/ruff format --check gateway tests
	$(BIN)/ruff check gateway tests
	$(BIN)/mypy

check: lint test

# Not part of `make test`. BENCH_QUICK=1: smaller and shorter runs (a smoke test).
# The last part, replicas on PostgreSQL + Redis vs one on SQLite, Redis-shared limits and
# --workers 2 (tests/bench_scaling.py), runs when postgres and redis-server are installed
# (else it says why and skips); BENCH_SCALING=0 leaves it out.
bench: $(STAMP)
	$(BIN)/python -m tests.bench_micro
	$(BIN)/python -m tests.bench $(if $(filter 1,$(BENCH_QUICK)),--quick)
	$(BIN)/python -m tests.bench_streams
	if [ "$$BENCH_SCALING" != 0 ]; then $(BIN)/python -m tests.bench_scaling; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov build *.egg-info
