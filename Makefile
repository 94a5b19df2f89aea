# Two commands for a fresh machine:
#   make run    start pypooler (an embedded throwaway PostgreSQL when none is configured)
#   make test   run the whole test suite (lint, types, unit and integration tests)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pypooler run $(if $(CONFIG),--config $(CONFIG),)

lint: $(STAMP)
	$(VENV)/bin/ruff check pypooler tests bench
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider
