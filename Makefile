# Two commands for a fresh machine:
#   make run    start pypooler (an embedded throwaway PostgreSQL when none is configured)
#   make test   run the whole test suite (lint, types, unit and integration tests)
#   make bench  direct vs PgBouncer vs pypooler, report and plots in bench/results/ (<= 20 min;
#               BENCH_ARGS=--quick for a few minutes)
# Both `run` and `test` first compile the hot-path modules with mypyc (setup.py), in place:
# pypooler/**/*.so beside the sources, rebuilt whenever a source changes (about 40 s).
# PYPOOLER_PURE=1 runs the Python sources instead; `make clean-compiled` removes the build.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# The compiled group's shared library stands for the whole build.
COMPILED := pypooler/native__mypyc$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SOURCES := $(wildcard pypooler/*.py pypooler/protocol/*.py)

.PHONY: run test lint bench compile clean-compiled

# The editable install builds no compiled modules (PYPOOLER_MYPYC=0): $(COMPILED) builds them in
# place, and fails if it cannot (PYPOOLER_MYPYC=1), where a wheel would fall back to pure Python.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 'setuptools>=77'  # setup.py (mypyc) reads PEP 639 metadata
	PYPOOLER_MYPYC=0 $(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	PYPOOLER_MYPYC=0 $(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# The `touch`: build_ext copies an unchanged module with its old time, and pypooler's
# stale-build check compares times.
$(COMPILED): $(STAMP) setup.py $(SOURCES)
	find pypooler -name '*.so' -delete
	PYPOOLER_MYPYC=1 $(VENV)/bin/python setup.py -q build_ext --inplace
	find pypooler -name '*.so' -exec touch {} +

compile: $(COMPILED)

clean-compiled:
	find pypooler -name '*.so' -delete
	rm -rf build

run: $(COMPILED)
	$(VENV)/bin/pypooler run $(if $(CONFIG),--config $(CONFIG),)

lint: $(STAMP)
	$(VENV)/bin/ruff check pypooler tests bench
	$(VENV)/bin/ruff format --check pypooler tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck docker/entrypoint.sh

bench: $(BENCH_STAMP) $(COMPILED)
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

# The suite twice: on the compiled build (what `make run` runs), then on the Python sources
# (what the container image and a plain `pip install` run). Under the compiled build the pool
# unit tests skip themselves: their duck-typed fakes need the sources.
test: lint $(COMPILED)
	$(VENV)/bin/pytest -q -p no:cacheprovider
	PYPOOLER_PURE=1 $(VENV)/bin/pytest -q -p no:cacheprovider
