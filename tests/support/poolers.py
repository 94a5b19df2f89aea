"""A pypooler served by a uvloop in a daemon thread (conftest's `start_pooler` fixture starts them).

Its own loop in a background thread, so tests may drive it both from async code (asyncpg, psycopg
async, in pytest-asyncio's loop) and from blocking subprocesses (psql, pgbench) without the two
loops starving each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import uvloop

from pypooler.app import Pooler
from pypooler.config import Settings

T = TypeVar("T")


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
