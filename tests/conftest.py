"""Shared fixtures: a throwaway PostgreSQL per session, and pypooler instances in a thread
(tests/support/poolers.py). Every asyncio test runs on uvloop. The helpers the fixtures and tests
share live in tests/support/.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from pypooler.config import load_settings
from pypooler.embedded import EmbeddedPostgres
from tests.support.neon_driver import neon_driver_installed
from tests.support.poolers import RunningPooler


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Subprocesses a test starts; killed (if still running) and their pipes closed at the end."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    """PostgreSQL 15 with max_connections=20 (17 for ordinary roles), shared by the session."""
    with EmbeddedPostgres(max_connections=20) as pg:
        yield pg


@contextlib.contextmanager
def pooler_factory(postgres: EmbeddedPostgres) -> Iterator[Callable[..., RunningPooler]]:
    """Factory: start(pool_size=5, pool_mode="session", ...) -> RunningPooler; all stopped at exit.

    Keyword arguments override settings; `databases` defaults to one entry per test database name
    pointing at the session PostgreSQL, with `pool_size`/`pool_mode`/`user`/`password` applied.
    """
    started: list[RunningPooler] = []

    def start(**overrides: Any) -> RunningPooler:
        db_keys = ("pool_size", "pool_mode", "user", "password")
        db = {k: overrides.pop(k) for k in db_keys if k in overrides}
        overrides.setdefault("listen_port", 0)
        overrides.setdefault("metrics_port", 0)
        overrides.setdefault("log_connections", False)
        overrides.setdefault("log_disconnections", False)
        overrides.setdefault(
            "databases",
            {
                "pypooler_test": {"host": postgres.host, "port": postgres.port, **db},
                "postgres": {"host": postgres.host, "port": postgres.port, **db},
            },
        )
        settings = load_settings(None, env={}, **overrides)
        running = RunningPooler(settings)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture
def start_pooler(postgres: EmbeddedPostgres) -> Iterator[Callable[..., RunningPooler]]:
    """pooler_factory for one test."""
    with pooler_factory(postgres) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_pooler(postgres: EmbeddedPostgres) -> Iterator[Callable[..., RunningPooler]]:
    """pooler_factory for a whole module: its tests share the poolers, so each must leave them as
    it found them (no client left, no session state)."""
    with pooler_factory(postgres) as start:
        yield start


@pytest.fixture(scope="session")
def neon_driver() -> Path:
    """tests/node with @neondatabase/serverless and its helpers installed (tests/support/neon_driver.py)."""
    return neon_driver_installed()
