"""Pool: the bounded set of server connections for one (database, user), and who waits for them.

Rules:
- Bounded: servers open + servers connecting <= `size`, always.
- Idle servers are reused LIFO (the most recently used one has warm caches; the cold ones age out
  through `server_idle_timeout`). Waiting clients are served FIFO.
- `checkout` is a plain synchronous call: it returns an idle server at once or queues the client.
  `release` hands the server straight to the first client still waiting (a direct call, no Future,
  no trip through the idle list), because under load nearly every transaction takes that path.
- A waiter that gave up (disconnected or timed out) stays in the deque with `waiting` cleared and is
  skipped when reached; removing from the middle of a deque would be O(n).
- The pool never touches sockets itself; it asks `open_server_connection` for new servers.
- A server with a CancelRequest still being delivered is not lent again until delivery ends:
  the cancel must never reach the next borrower's query.
- In transaction and statement mode each server gets a `RewritingBackend` and a bounded
  `ServerStatements`; the pool's `StatementRegistry` names statements for all its servers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from pypooler.config import DatabaseConfig, PoolMode, Settings
from pypooler.errors import PoolerError, QueryWaitTimeout, ServerConnectFailed, ShuttingDown
from pypooler.prepared import ServerStatements, StatementRegistry
from pypooler.rewriting import RewritingBackend
from pypooler.server import ServerConnection, ServerLogin, intern_parameters, open_server_connection
from pypooler.session_parameters import READ_ONLY
from pypooler.stats import PoolStats

if TYPE_CHECKING:
    from pypooler.client import ClientConnection

log = logging.getLogger("pypooler.pool")

NS_PER_S = 1_000_000_000


class Pool:
    def __init__(
        self,
        database: str,
        user: str,
        login: ServerLogin,
        *,
        size: int,
        mode: PoolMode,
        settings: Settings,
    ) -> None:
        self.database = database
        self.user = user
        self.login = login
        self.size = size
        self.mode: PoolMode = mode
        self.settings = settings
        self.idle: list[ServerConnection] = []
        self.servers: set[ServerConnection] = set()  # every logged-in server, idle or lent
        self.connecting = 0
        self.waiters: deque[ClientConnection] = deque()
        self.waiting = 0  # waiters still wanting a server (the deque may hold ones that left)
        self.parameters: dict[str, str] | None = None  # the first server's ParameterStatus set
        # Lower-case names of those parameters a session can change: a client's SET of one is
        # no session-state leak, pypooler restores each client's own value.
        self.tracked: frozenset[bytes] = frozenset()
        self.rewriting = mode != "session"
        self.statements = StatementRegistry()
        self.verdicts: dict[bytes, tuple[str, ...]] = {}  # see RewritingFrontend
        self._parameters_ready: asyncio.Future[None] | None = None
        self.last_connect_error: PoolerError | None = None
        self._retry_at_ns = 0  # no new server connects before this (server_login_retry)
        self.stats = PoolStats()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Pool {self.database}/{self.user} {self.lent}/{self.size} lent, {self.waiting} waiting>"

    @property
    def lent(self) -> int:
        return len(self.servers) - len(self.idle)

    # ------------------------------------------------------------------ lending

    def checkout(self, client: ClientConnection) -> ServerConnection | None:
        """An idle server now, or None with the client queued (it will get `link` called)."""
        if self.closed:
            raise ShuttingDown("pypooler is shutting down")
        idle = self.idle
        while idle:
            server = idle.pop()
            if not server.closed:
                return server
        client.waiting = True
        client.wait_started_ns = time.monotonic_ns()
        self.waiters.append(client)
        self.waiting += 1
        self._open_servers_for_waiters()
        return None

    def release(self, server: ServerConnection) -> None:
        """Take back a clean server (ReadyForQuery 'I', nothing pending) and lend it on."""
        if server.closed:
            return
        if server.cancels:
            server.release_after_cancel = True  # see the module rules; send_cancel releases it
            return
        lifetime = self.settings.server_lifetime
        if lifetime and time.monotonic_ns() - server.created_ns > lifetime * NS_PER_S:
            server.close()
            return
        waiters = self.waiters
        while waiters:
            client = waiters.popleft()
            if client.waiting:
                client.waiting = False
                self.waiting -= 1
                self.stats.wait_count += 1
                self.stats.total_wait_ns += time.monotonic_ns() - client.wait_started_ns
                client.link(server)
                return
        server.last_used_ns = time.monotonic_ns()
        self.idle.append(server)

    def cancel_wait(self, client: ClientConnection) -> None:
        if client.waiting:
            client.waiting = False
            self.waiting -= 1

    def server_closed(self, server: ServerConnection) -> None:
        """A server is gone (died, or closed by us): forget it and replace it if clients wait."""
        if server in self.servers:
            self.servers.discard(server)
            if server in self.idle:
                self.idle.remove(server)
        if server.statements is not None:
            server.statements.clear()
        self._open_servers_for_waiters()

    # ------------------------------------------------------------------ opening servers

    def _open_servers_for_waiters(self) -> None:
        if self.closed or (self._retry_at_ns and time.monotonic_ns() < self._retry_at_ns):
            return
        wanted = self.waiting - self.connecting
        room = self.size - len(self.servers) - self.connecting
        for _ in range(min(wanted, room)):
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._open_server())

    async def _open_server(self) -> None:
        started = time.monotonic_ns()
        try:
            server = await open_server_connection(self.login, self.settings.server_connect_timeout)
        except PoolerError as exc:
            self.connecting -= 1
            self._connect_failed(exc)
            return
        except BaseException:  # cancelled at shutdown, or a bug: never leak the pool slot
            self.connecting -= 1
            raise
        self.connecting -= 1
        self.stats.server_connects += 1
        self.stats.server_connect_ns += time.monotonic_ns() - started
        self.last_connect_error = None
        if self.closed or server.closed:
            server.close()
            return
        self.servers.add(server)
        server.on_close = self.server_closed
        server.parameters = intern_parameters(server.parameters)
        if self.rewriting:
            server.backend = RewritingBackend(server.parameter_status)
            if self.settings.max_prepared_statements:
                server.statements = ServerStatements(self.statements, self.settings.max_prepared_statements)
        if self.parameters is None:
            self.parameters = server.parameters
            self.tracked = frozenset(
                name.lower().encode() for name in server.parameters if name.lower() not in READ_ONLY
            )
            if self._parameters_ready is not None and not self._parameters_ready.done():
                self._parameters_ready.set_result(None)
        self.release(server)

    def _connect_failed(self, exc: PoolerError) -> None:
        self.last_connect_error = exc
        self.stats.server_connect_failures += 1
        log.warning("pool %s/%s: %s", self.database, self.user, exc.message)
        if self._parameters_ready is not None and not self._parameters_ready.done():
            self._parameters_ready.set_exception(exc)
            self._parameters_ready.exception()  # retrieved here; waiters re-raise it
            self._parameters_ready = None
        if self.servers or self.connecting:
            return  # servers exist or are coming; the waiters will be served by them
        retry = self.settings.server_login_retry
        if retry:
            # Like PgBouncer: keep the waiters (query_wait_timeout bounds them) and try again later.
            self._retry_at_ns = time.monotonic_ns() + int(retry * NS_PER_S)
            asyncio.get_running_loop().call_later(retry, self._retry_connect)
            return
        # No server can serve the waiters now: tell them why instead of leaving them hanging.
        while self.waiters:
            client = self.waiters.popleft()
            if client.waiting:
                client.waiting = False
                self.waiting -= 1
                client.fail(exc)

    def _retry_connect(self) -> None:
        self._retry_at_ns = 0
        self._open_servers_for_waiters()

    async def ensure_parameters(self) -> dict[str, str]:
        """The server ParameterStatus set new clients are welcomed with (opens a server if needed)."""
        while self.parameters is None:
            if self._parameters_ready is None:
                self._parameters_ready = asyncio.get_running_loop().create_future()
                if len(self.servers) + self.connecting >= self.size:
                    raise ServerConnectFailed("pool is full but has no server parameters yet")
                self.connecting += 1
                asyncio.get_running_loop().create_task(self._open_server())
            await asyncio.shield(self._parameters_ready)
        return self.parameters

    # ------------------------------------------------------------------ maintenance

    def expire(self, now_ns: int) -> None:
        """Time out waiters past query_wait_timeout and close servers idle too long."""
        timeout = self.settings.query_wait_timeout
        if timeout and self.waiting:
            limit = now_ns - int(timeout * NS_PER_S)
            waiters = self.waiters
            while waiters and (not waiters[0].waiting or waiters[0].wait_started_ns <= limit):
                client = waiters.popleft()
                if client.waiting:
                    client.waiting = False
                    self.waiting -= 1
                    client.fail(
                        QueryWaitTimeout(
                            f"query_wait_timeout: no server connection for {self.database}/"
                            f"{self.user} became free within {timeout:g} s",
                            detail=f"pool_size {self.size}: all {self.lent} servers were busy",
                            hint="transactions hold servers too long, or pool_size is too small",
                        )
                    )
        idle_timeout = self.settings.server_idle_timeout
        if idle_timeout and self.idle:
            limit = now_ns - int(idle_timeout * NS_PER_S)
            # idle is LIFO, so the longest-idle servers are at the front.
            while self.idle and self.idle[0].last_used_ns <= limit:
                self.idle.pop(0).close()

    def close(self) -> None:
        self.closed = True
        for server in list(self.servers):
            server.close()
        while self.waiters:
            client = self.waiters.popleft()
            if client.waiting:
                client.waiting = False
                self.waiting -= 1
                client.fail(ShuttingDown("pypooler is shutting down"))


class PoolManager:
    """Finds or creates the pool for a (database, user) from the configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pools: dict[tuple[str, str], Pool] = {}

    def database_config(self, database: str) -> tuple[str, DatabaseConfig] | None:
        """The [databases] entry serving `database`: its own, else the '*' fallback."""
        databases = self.settings.databases
        if database in databases:
            return database, databases[database]
        if "*" in databases:
            return "*", databases["*"]
        return None

    def get_pool(self, database: str, client_user: str) -> Pool | None:
        found = self.database_config(database)
        if found is None:
            return None
        entry, db = found
        user = db.user or client_user
        key = (database, user)
        pool = self.pools.get(key)
        if pool is None:
            dbname = db.dbname or database
            login = ServerLogin(db.host, db.port, dbname, user, db.password)
            pool = Pool(
                database,
                user,
                login,
                size=db.pool_size or self.settings.default_pool_size,
                mode=db.pool_mode or self.settings.pool_mode,
                settings=self.settings,
            )
            self.pools[key] = pool
            log.debug("new pool %s/%s -> %s (entry %s)", database, user, login.describe(), entry)
        return pool

    def expire(self) -> None:
        now = time.monotonic_ns()
        for pool in self.pools.values():
            pool.expire(now)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
