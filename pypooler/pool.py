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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from pypooler.config import DatabaseConfig, PoolMode, Settings
from pypooler.errors import (
    IdleTransactionTimeout,
    PoolerError,
    QueryWaitTimeout,
    ServerConnectFailed,
    ShuttingDown,
)
from pypooler.protocol import codec
from pypooler.server import ServerConnection, ServerLogin, open_server_connection
from pypooler.stats import PoolStats, Snapshot

if TYPE_CHECKING:
    from pypooler.client import ClientConnection

log = logging.getLogger("pypooler.pool")

NS_PER_S = 1_000_000_000
SNAPSHOTS_KEPT = 2  # the window is one to two stats periods long


def shutdown_refused() -> ShuttingDown:
    """What a client that wants a new transaction during a drain is told (SQLSTATE 57P01,
    which drivers and pools take as "reconnect")."""
    return ShuttingDown(
        "pypooler is shutting down: no new transactions are started",
        hint="reconnect; this pooler is draining",
    )


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
        self._parameters_ready: asyncio.Future[None] | None = None
        self._welcome: bytes | None = None  # built from `parameters` on first use
        self.last_connect_error: PoolerError | None = None
        self._retry_at_ns = 0  # no new server connects before this (server_login_retry)
        self.stats = PoolStats(
            max_applications=settings.stats_max_applications,
            max_statements=settings.stats_max_statements,
        )
        self.clients: set[ClientConnection] = set()  # welcomed clients of this pool
        # Taken every stats_period; [0] starts the window that averages and advice cover.
        self.snapshots: deque[Snapshot] = deque(maxlen=SNAPSHOTS_KEPT)
        self._last_wait_warning_ns = 0
        self.closed = False
        # Set when released servers may be unwanted (draining, a reload changed the login or
        # shrank the pool): release() then looks closer, and costs one attribute read otherwise.
        self.retiring = False

    def __repr__(self) -> str:
        return f"<Pool {self.database}/{self.user} {self.lent}/{self.size} lent, {self.waiting} waiting>"

    @property
    def lent(self) -> int:
        return len(self.servers) - len(self.idle)

    # ------------------------------------------------------------------ lending

    def checkout(self, client: ClientConnection) -> ServerConnection | None:
        """An idle server now, or None with the client queued (it will get `link` called)."""
        if self.closed:
            raise shutdown_refused()
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
        if self.retiring and self._retire(server):
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
                client.link(server)
                return
        server.last_used_ns = time.monotonic_ns()
        self.idle.append(server)

    def _retire(self, server: ServerConnection) -> bool:
        """Close a released server the pool no longer wants; False if it may be lent again."""
        if self.closed or not same_login(server.login, self.login) or len(self.servers) > self.size:
            server.close()
            return True
        if len(self.servers) <= self.size and all(same_login(s.login, self.login) for s in self.servers):
            self.retiring = False  # every server left is wanted again
        return False

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
        self.stats.server_connect.observe(time.monotonic_ns() - started)
        self.last_connect_error = None
        if self.closed or server.closed:
            server.close()
            return
        self.servers.add(server)
        server.on_close = self.server_closed
        if self.parameters is None:
            self.parameters = dict(server.parameters)
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

    def welcome_prefix(self) -> bytes:
        """AuthenticationOk and the ParameterStatus set minus application_name, built once."""
        if self._welcome is None:
            parameters = self.parameters or {}
            self._welcome = codec.AUTHENTICATION_OK + codec.build_parameter_statuses(
                {k: v for k, v in parameters.items() if k != "application_name"}
            )
        return self._welcome

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
                    self.warn_wait(client, now_ns - client.wait_started_ns, timed_out=True)
                    client.fail(
                        QueryWaitTimeout(
                            f"query_wait_timeout: no server connection for {self.database}/"
                            f"{self.user} became free within {timeout:g} s",
                            detail=f"pool_size {self.size}: all {self.lent} servers were busy",
                            hint="transactions hold servers too long, or pool_size is too small",
                        )
                    )
        if self.lent and (self.settings.hold_warn_ms or self.settings.idle_transaction_timeout):
            self._watch_holders(now_ns)
        idle_timeout = self.settings.server_idle_timeout
        if idle_timeout and self.idle:
            limit = now_ns - int(idle_timeout * NS_PER_S)
            # idle is LIFO, so the longest-idle servers are at the front.
            while self.idle and self.idle[0].last_used_ns <= limit:
                self.idle.pop(0).close()

    def holders(self, now_ns: int) -> list[ClientConnection]:
        """Clients holding a server right now, longest hold first."""
        clients = [s.client for s in self.servers if s.client is not None]
        return sorted(clients, key=lambda c: c.lent_ns)

    def _watch_holders(self, now_ns: int) -> None:
        """Hog detection: warn about, or end, clients that sit idle inside a transaction."""
        warn_ns = self.settings.hold_warn_ms * 1e6
        timeout_ns = self.settings.idle_transaction_timeout * NS_PER_S
        for client in self.holders(now_ns):
            if not (client.idle_since_ns and client.idle_in_xact):
                continue
            idle = now_ns - client.idle_since_ns
            if timeout_ns and idle > timeout_ns:
                client.fail(
                    IdleTransactionTimeout(
                        "terminating connection due to idle_transaction_timeout: idle in a"
                        f" transaction for {idle / 1e9:.1f} s while holding a server",
                        hint="commit or roll back before doing non-database work",
                    )
                )
            elif warn_ns and idle > warn_ns and not client.hog_warned:
                client.hog_warned = True
                log.warning(
                    "pool %s/%s: %s has held a server idle in transaction for %.0f ms",
                    self.database, self.user, describe_holder(client, now_ns), idle / 1e6,
                )

    def warn_wait(self, client: ClientConnection, waited_ns: int, *, timed_out: bool = False) -> None:
        """Say why a client waited: name the top holders (at most one line a second per pool)."""
        now = time.monotonic_ns()
        if not timed_out and now - self._last_wait_warning_ns < NS_PER_S:
            return
        self._last_wait_warning_ns = now
        holders = self.holders(now)
        log.warning(
            "pool %s/%s: client %s app=%s %s %.0f ms for a server (pool_size %d, %d waiting);"
            " top holders: %s",
            self.database, self.user, client.peer, client.application_name or "-",
            "gave up after" if timed_out else "waited", waited_ns / 1e6, self.size, self.waiting,
            "; ".join(describe_holder(c, now) for c in holders[:3]) or "none",
        )

    def reconfigure(self, settings: Settings, login: ServerLogin, size: int) -> list[str]:
        """Apply a reloaded configuration; return what changed, for the log.

        Lent servers are never taken from their clients: one the pool no longer wants (old
        login, too many for a smaller size) is closed when its transaction releases it.
        """
        changes: list[str] = []
        self.settings = settings
        if not same_login(login, self.login):
            changes.append(f"server {self.login.describe()} -> {login.describe()}")
            self.login = login
            self.retiring = True
        if size != self.size:
            changes.append(f"pool_size {self.size} -> {size}")
            self.retiring = self.retiring or size < self.size
            self.size = size
        if self.retiring:
            for server in [s for s in self.idle if not same_login(s.login, login)]:
                server.close()
            while len(self.servers) > self.size and self.idle:
                self.idle.pop(0).close()  # the longest idle first
        self._open_servers_for_waiters()  # a bigger pool serves its queue at once
        return changes

    def drain(self) -> None:
        """Shutdown, first step: refuse new transactions (waiters now, checkouts from here
        on) and close idle servers; lent servers are closed as their transactions end."""
        self.closed = True
        self.retiring = True
        while self.idle:
            self.idle.pop().close()
        while self.waiters:
            client = self.waiters.popleft()
            if client.waiting:
                client.waiting = False
                self.waiting -= 1
                client.fail(shutdown_refused())

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


def same_login(a: ServerLogin, b: ServerLogin) -> bool:
    def key(login: ServerLogin) -> tuple[str, int, str, str, str | None]:
        return (login.host, login.port, login.database, login.user, login.password)

    return key(a) == key(b)


def describe_holder(client: ClientConnection, now_ns: int) -> str:
    """One holder for a log line: who, for how long, doing what."""
    held_ms = (now_ns - client.lent_ns) / 1e6
    if client.idle_since_ns and client.idle_in_xact:
        state = f"idle in transaction {(now_ns - client.idle_since_ns) / 1e6:.0f} ms"
    elif client.idle_since_ns:
        state = "idle"
    else:
        state = "active"
    statement = client.frontend.last_statement[:80].decode("utf-8", "replace")
    return (
        f"{client.peer} app={client.application_name or '-'} held {held_ms:.0f} ms, {state},"
        f" last statement: {statement!r}"
    )


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

    def reload(self, settings: Settings) -> list[str]:
        """Use `settings` from now on; reconfigure live pools; return what changed per pool.

        A pool whose database entry is gone keeps serving the clients it has (new clients get
        "no such database"); pool_mode and stats limits apply to pools created from now on.
        """
        self.settings = settings
        changes: list[str] = []
        for pool in self.pools.values():
            found = self.database_config(pool.database)
            if found is None:
                pool.settings = settings
                continue
            _, db = found
            login = ServerLogin(db.host, db.port, db.dbname or pool.database, pool.user, db.password)
            size = db.pool_size or settings.default_pool_size
            changes += [
                f"pool {pool.database}/{pool.user}: {change}"
                for change in pool.reconfigure(settings, login, size)
            ]
        return changes

    def drain(self) -> None:
        for pool in self.pools.values():
            pool.drain()

    def expire(self) -> None:
        now = time.monotonic_ns()
        for pool in self.pools.values():
            pool.expire(now)

    def take_snapshots(self) -> None:
        for pool in self.pools.values():
            pool.snapshots.append(Snapshot(pool.stats))

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
