# Two commands for a fresh machine:
#   make run    start pypooler (an embedded throwaway PostgreSQL when none is configured)
#   make test   run the whole test suite (lint, types, unit and integration tests)
#   make bench  direct vs PgBouncer vs pypooler, report and plots in bench/results/ (<= 20 min;
#               BENCH_ARGS=--quick for a few minutes)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(VENV)/bin/pypooler run $(if $(CONFIG),--config $(CONFIG),)

lint: $(STAMP)
	$(VENV)/bin/ruff check pypooler tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck docker/entrypoint.sh

bench: $(BENCH_STAMP)
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider
