"""Shared fixtures: a throwaway PostgreSQL per session, and pypooler instances in a thread.

The pooler runs on its own uvloop in a background thread, so tests may drive it both from async
code (asyncpg, psycopg async, in pytest-asyncio's loop) and from blocking subprocesses (psql,
pgbench) without the two loops starving each other. Every asyncio test runs on uvloop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from pypooler.app import Pooler
from pypooler.config import Settings, load_settings
from pypooler.embedded import EmbeddedPostgres

T = TypeVar("T")


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


class RunningPooler:
    """A pypooler listening on 127.0.0.1:<port>, served by a uvloop in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = uvloop.new_event_loop()
        self.pooler = Pooler(settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="pooler")
        self._thread.start()
        self.call_async(self.pooler.start())
        self.port = self.pooler.port
        self.host = settings.listen_addr
        self.metrics_url = f"http://{settings.metrics_addr}:{self.pooler.metrics.port}"

    def call_async(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run `fn` on the pooler's loop (pool state is only consistent there)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def dsn(
        self,
        user: str = "postgres",
        dbname: str = "pypooler_test",
        password: str | None = None,
        **params: str,
    ) -> str:
        auth = f"{user}:{password}" if password else user
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}" + (f"?{query}" if query else "")

    def pool(self, database: str = "pypooler_test", user: str = "postgres") -> Any:
        return self.pooler.manager.pools[(database, user)]

    def server_count(self, database: str = "pypooler_test", user: str = "postgres") -> int:
        """Servers open or connecting in a pool (0 before the pool exists)."""

        def count() -> int:
            pool = self.pooler.manager.pools.get((database, user))
            return len(pool.servers) + pool.connecting if pool else 0

        return self.call(count)

    def stop(self) -> None:
        try:
            self.call_async(self.pooler.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def start_pooler(postgres: EmbeddedPostgres) -> Iterator[Callable[..., RunningPooler]]:
    """Factory: start_pooler(pool_size=5, pool_mode="session", ...) -> RunningPooler.

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

    yield start
    for running in started:
        running.stop()
