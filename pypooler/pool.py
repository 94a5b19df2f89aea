"""Pool: the bounded set of server connections for one (database, user), and who waits for them.

This module is the one lend path: every server a client (or pypooler itself) gets comes from
`checkout` (an idle server at once, else a queue place and a new connection if the bound allows),
and every server given back goes through `release` (handed to the first waiter, or kept idle) or
`give_back` (release or close, by the release rule's answer). Clients never touch `idle` or
`waiters`: they may peek at `next_idle` to choose their own fast path, then call `checkout`.
Whether a server may be given back at all is decided by the release rule in
protocol/transaction.py (`releasable`), never here. Lending stays in this module rather than a
separate lending.py because its state (idle list, waiters, bound, drain flags) is the pool's
state: split apart, either module would have to read the other's fields.

Rules:
- Bounded: servers open + servers connecting <= `size`, always; plus `reserve_size` more while
  `reserve_open` (reserve_pool, opened by the maintenance pass once a client has waited
  reserve_pool_timeout). Every pool of a database, and every pool of a server user, also shares
  a `SharedBound` (max_db_connections, max_user_connections): a pool whose own bound has room
  but a shared one has none closes an idle server of a sibling pool to make room, and a server
  that goes away wakes the siblings that wait. Whatever opens a server (waiters, min_pool_size)
  goes through `_open_servers` and so keeps every bound.
- Idle servers are reused LIFO (the most recently used one has warm caches; the cold ones age out
  through `server_idle_timeout`). Waiting clients are served FIFO.
- `checkout` is a plain synchronous call: it returns an idle server at once or queues the client.
  `release` hands the server straight to the first client still waiting (a direct call, no Future,
  no trip through the idle list), because under load nearly every transaction takes that path.
- Waiters leave the queue only through `take_waiter` (the first one still waiting: at a release,
  and one by one when they time out); `_fail_waiters` is the one loop that tells every waiter no
  server will come (connect failure, drain, close).
- A waiter that gave up (disconnected or timed out) stays in the deque with `waiting` cleared and is
  skipped when reached; removing from the middle of a deque would be O(n).
- The pool never touches sockets itself; it asks `open_server_connection` for new servers.
- A server with a CancelRequest still being delivered is not lent again until delivery ends
  (`cancel_started` / `cancel_delivered`): the cancel must never reach the next borrower's query.
- In transaction and statement mode each server gets a `RewritingBackend` and a bounded
  `ServerStatements`; the pool's `StatementRegistry` names statements for all its servers.
- Timeouts (query_wait_timeout, server_idle_timeout, server_lifetime, idle_transaction_timeout,
  server_login_retry) are decided by the maintenance pass (maintenance.py), which calls the small
  methods under "maintenance.py's calls"; the pool keeps no timer of its own.
- A waiter is anything with `waiting`, `wait_started_ns`, `link` and `fail`: a ClientConnection,
  an HttpClient (a `POST /sql` request), or a `Borrower` when pypooler needs a server for itself
  (auth_query). A holder (`Holder`) is a ClientConnection or an HttpClient holding a server.
- Admin states cost the hot path one attribute test: `release` looks closer only when `draining`
  is set (PAUSE: every server is closed as it comes back; RECONNECT/RELOAD: servers marked
  `close_needed` are). While paused the idle list is kept empty, so `checkout` needs no test at
  all: it queues, and `_open_servers_for_waiters` opens nothing until RESUME.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from pypooler.config import DatabaseConfig, PoolMode, Settings
from pypooler.holders import statement_text
from pypooler.hosts import HostList
from pypooler.keepalive import keepalive_options
from pypooler.log_limits import LogLimiter
from pypooler.parameter_sets import ParameterSet, intern_parameters
from pypooler.prepared import SchemaVersion, ServerStatements, StatementRegistry
from pypooler.protocol import codec
from pypooler.protocol.errors import (
    AuthLookupFailed,
    DatabaseDisabled,
    NoSuchDatabase,
    PoolerError,
    ServerConnectFailed,
    ShuttingDown,
    StartupParameterRejected,
    TooManyPools,
)
from pypooler.protocol.scram import Secret
from pypooler.protocol.transaction import BackendStream
from pypooler.rewriting import RewritingBackend
from pypooler.server import ServerConnection, ServerLogin, open_server_connection
from pypooler.session_parameters import READ_ONLY, spelling_sql
from pypooler.stats import NS_PER_S, PoolStats, Snapshot
from pypooler.tls import server_ssl_context

if TYPE_CHECKING:
    from pypooler.client import ClientConnection
    from pypooler.http_client import HttpClient
    from pypooler.listening import Listener

log = logging.getLogger("pypooler.pool")


class Waiter(Protocol):
    """Who may queue for a server: `link` hands one over, `fail` says none will come."""

    waiting: bool
    wait_started_ns: int

    @property
    def peer(self) -> str: ...  # for log lines about waits

    @property
    def application_name(self) -> str: ...

    def link(self, server: ServerConnection) -> None: ...

    def fail(self, exc: PoolerError) -> None: ...


class StatementNotes(Protocol):
    @property
    def last_statement(self) -> bytes: ...


class Holder(Protocol):
    """Who holds a lent server, as the holders view, the hog lines and the timeouts of the
    maintenance pass read it: a ClientConnection, or an HttpClient."""

    hog_warned: bool

    @property
    def server(self) -> ServerConnection | None: ...
    @property
    def lent_ns(self) -> int: ...
    @property
    def query_start_ns(self) -> int: ...
    @property
    def idle_since_ns(self) -> int: ...  # 0 while the server works for it
    @property
    def idle_in_xact(self) -> bool: ...
    @property
    def idle_ns(self) -> int: ...
    @property
    def peer(self) -> str: ...
    @property
    def application_name(self) -> str: ...
    @property
    def frontend(self) -> StatementNotes: ...

    def fail(self, exc: PoolerError) -> None: ...


class Borrower:
    """A waiter for pypooler's own use of a server (auth_query): resolves a future."""

    __slots__ = ("future", "pool", "wait_started_ns", "waiting")
    peer = "pypooler"
    application_name = "auth_query"

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.future: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()
        self.waiting = False
        self.wait_started_ns = 0

    def link(self, server: ServerConnection) -> None:
        if self.future.done():  # the borrower gave up in the meantime
            self.pool.release(server)
        else:
            self.future.set_result(server)

    def fail(self, exc: PoolerError) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


WELCOMES_KEPT = 256  # distinct startup packets remembered per pool (then forgotten at once)
SPELLINGS_KEPT = 1024  # (name, value) spellings remembered per pool (then forgotten at once)


class Welcome(NamedTuple):
    """What ClientConnection._welcome works out from a startup packet, for a pool."""

    parameters: ParameterSet  # the session as the client will know it
    other_settings: dict[str, str]  # settings from the packet that no ParameterStatus reports
    apply_first: bool  # values no server has accepted yet: applied with a round trip
    statuses: bytes  # AuthenticationOk and the ParameterStatus messages
    startup_values: dict[str, str]  # reported settings the packet sets: what RESET returns to


SHUTDOWN_POLL_S = 0.005
# Stats snapshots kept per pool: the latest two bound the last complete stats_period.
SNAPSHOTS_KEPT = 2


def shutdown_refused() -> ShuttingDown:
    """What a client that wants a new transaction during a drain is told (SQLSTATE 57P01,
    which drivers and pools take as "reconnect")."""
    return ShuttingDown(
        "pypooler is shutting down: no new transactions are started",
        hint="reconnect; this pooler is draining",
    )


class SharedBound:
    """max_db_connections or max_user_connections: servers open or connecting across every pool
    of one database, or of one server user; `limit` 0 is no bound (see the module rules)."""

    __slots__ = ("limit", "name", "pools")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.pools: set[Pool] = set()

    @property
    def used(self) -> int:
        return sum(pool.occupied for pool in self.pools)

    def room(self) -> int:
        return self.limit - self.used if self.limit else 1 << 30


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
        schema: SchemaVersion | None = None,
        log_limiter: LogLimiter | None = None,
    ) -> None:
        # Shared with the manager's other pools and the clients (log_limits.py).
        self.log_limiter = log_limiter if log_limiter is not None else LogLimiter()
        self.database = database
        self.user = user
        self.login = login
        self.size = size
        self.mode: PoolMode = mode
        self.settings = settings
        self.wait_warn_ns = settings.wait_warn_ms * 1e6  # 0: never warn
        self.idle: list[ServerConnection] = []
        self.servers: set[ServerConnection] = set()  # every logged-in server, idle or lent
        self.connecting = 0
        # Closed servers whose backend has not ended yet (ServerConnection.close): still counted
        # against every bound until PostgreSQL closes the connection.
        self.ending: set[ServerConnection] = set()
        self.waiters: deque[Waiter] = deque()
        self.waiting = 0  # waiters still wanting a server (the deque may hold ones that left)
        self.parameters: dict[str, str] | None = None  # the first server's ParameterStatus set
        # Lower-case names of those parameters a session can change: a client's SET of one is
        # no session-state leak, pypooler restores each client's own value.
        self.tracked: frozenset[bytes] = frozenset()
        self.rewriting = mode != "session"
        # `schema` is shared by the pools of one PostgreSQL database (see prepared.py).
        self.statements = StatementRegistry(schema)
        self.verdicts: dict[bytes, tuple[str, ...]] = {}  # see RewritingFrontend
        self._parameters_ready: asyncio.Future[None] | None = None
        self._welcome: bytes | None = None  # built from `parameters` on first use
        self._parameter_names: dict[str, str] | None = None
        # What a login with a given startup packet is told and carries (see ClientConnection.
        # _welcome): most clients of a pool send the same packet, so it is worked out once.
        self.welcomes: dict[bytes, Welcome] = {}
        # (reported setting, value as a client gave it) -> the value as the server reports it
        # (see session_parameters.py): learned once, so welcomes stay a dict lookup.
        self.spellings: dict[tuple[str, str], str] = {}
        self.last_connect_error: PoolerError | None = None
        self.retry_at_ns = 0  # no new server connects before this (server_login_retry)
        self.stats = PoolStats(
            max_applications=settings.stats_max_applications,
            max_statements=settings.stats_max_statements,
        )
        # Welcomed clients of this pool, as a dict's keys: a set costs twice the bytes per client.
        self.clients: dict[ClientConnection, None] = {}
        # `POST /sql` requests in this pool (http_client.py), from their login to their response.
        self.http_clients: dict[HttpClient, None] = {}
        self._last_wait_warning_ns = 0
        self.closed = False
        # In-flight connects and the servers close() closed: what PoolManager.wait_closed() ends.
        self._opening: set[asyncio.Task[None]] = set()
        self._closing: list[ServerConnection] = []
        # Admin console and shutdown states (see the module rules): PAUSE/KILL set `paused` until
        # RESUME; `draining` tells `release` to look for servers to close instead of lending them.
        self.paused = False
        self.draining = False
        self._resumed: asyncio.Future[None] | None = None  # logins waiting for RESUME
        # Taken every stats_period; [0] starts the window that averages and advice cover.
        self.snapshots: list[Snapshot] = [Snapshot(self.stats)]
        # The pool's listener connection and its channels (listening.py), made at the first
        # LISTEN a client sends in transaction or statement mode; not one of `servers`.
        self.listener: Listener | None = None
        # Made for the "*" entry or for a client's own user name (PoolManager): removed once it
        # has been `unused` for autodb_idle_timeout since `unused_since_ns` (maintenance.py).
        self.auto = False
        self.unused_since_ns = 0
        self.min_size = 0  # min_pool_size: servers the maintenance pass keeps open
        self.reserve_size = 0  # reserve_pool: more servers once a client has waited long enough
        self.reserve_open = False  # the reserve may be used now (decided by the maintenance pass)
        self.bounds: tuple[SharedBound, ...] = ()  # max_db_connections, max_user_connections
        # A sibling pool waits for room under a full shared bound: a server released with no
        # waiter here is closed instead of kept idle, so the sibling can open one.
        self.siblings_starved = False

    def __repr__(self) -> str:
        return f"<Pool {self.database}/{self.user} {self.lent}/{self.size} lent, {self.waiting} waiting>"

    @property
    def occupied(self) -> int:
        """Backends this pool holds against its bounds: open, connecting, or not ended yet."""
        return len(self.servers) + self.connecting + len(self.ending)

    @property
    def unused(self) -> bool:
        """No client, server lent, connect, waiter or listener connection: nothing lost if it
        is removed (its idle servers closed)."""
        listener = self.listener
        return (
            not (self.clients or self.connecting or self.waiting or self._opening)
            and len(self.servers) == len(self.idle)
            and (listener is None or listener.unused)
        )

    @property
    def lent(self) -> int:
        return len(self.servers) - len(self.idle)

    # ------------------------------------------------------------------ lending

    @property
    def next_idle(self) -> ServerConnection | None:
        """The server `checkout` would lend right now (the idle one on top), or None if it would
        queue: a client's fast path looks at it before asking."""
        idle = self.idle
        return idle[-1] if idle else None

    def checkout(self, client: Waiter) -> ServerConnection | None:
        """An idle server now, or None with the client queued (it will get `link` called).

        `idle` never holds a closed server (`server_closed` takes it out), and a closed or paused
        pool keeps it empty, so a non-empty list answers at once.
        """
        idle = self.idle
        if idle:
            return idle.pop()
        if self.closed:
            raise shutdown_refused()
        client.waiting = True
        client.wait_started_ns = time.monotonic_ns()
        self.waiters.append(client)
        self.waiting += 1
        if self.occupied < self.size:  # else nothing to open: skip the call
            self._open_servers_for_waiters()
        return None

    def release(self, server: ServerConnection, now_ns: int = 0) -> None:
        """Take back a clean server (ReadyForQuery 'I', nothing pending) and lend it on.

        `now_ns`: the caller's clock reading, if it has one (saves a clock call per release).
        A server past server_lifetime is marked close_needed by the maintenance pass, so the
        `draining` test covers it too.
        """
        if server.closed:
            return
        if server.cancels:
            server.release_after_cancel = True  # see the module rules; send_cancel releases it
            return
        if self.draining and self._retire(server):
            return
        if self.waiters:  # waiters that left are dropped here too, as they are reached
            client = self.take_waiter()
            if client is not None:
                client.link(server)
                return
        if self.siblings_starved and self._yield_to_sibling(server):
            return
        server.last_used_ns = now_ns or time.monotonic_ns()
        self.idle.append(server)

    def give_back(self, server: ServerConnection, releasable: bool, *, busy: bool = False) -> None:
        """Return a server whose holder is done with it: `release` it if the release rule said
        so (`protocol.transaction.releasable` or `releasable_after_internal`), else close it (a
        server is never returned dirty). `busy` (`protocol.transaction.backend_busy`): its
        backend may be running the holder's query, so it is cancelled too, and the server
        counts against the bounds until the backend has ended (see ServerConnection.close)."""
        if releasable:
            self.release(server)
            return
        if server.closed:
            return  # closed already (KILL, a FATAL): cancelled then if it had to be
        server.close()
        if busy and server.process_id:
            self.cancel_ending(server)

    def cancel_ending(self, server: ServerConnection) -> None:
        """Cancel the query of a closed server whose backend may still run it. The maintenance
        pass asks again while the backend has not ended: a cancel that reaches a backend before
        it has read the query is ignored by PostgreSQL."""
        server.cancelled_ns = time.monotonic_ns()
        self.track_task(asyncio.get_running_loop().create_task(self._cancel_backend(server)))

    async def _cancel_backend(self, server: ServerConnection) -> None:
        """A closed server's query cancelled, so its backend reads the Terminate and ends; bounded
        like a connect (server_connect_timeout), and only logged if it fails: the maintenance
        pass aborts the connection if the backend does not end."""
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout):
                await server.cancel_backend()
        except (OSError, TimeoutError) as exc:
            self.log_limiter.log(
                log, logging.WARNING, ("cancel_failed", *server.address),
                "pool %s/%s: cancelling the query of a closed server failed: %s", self.database, self.user,
                exc or "timed out",
            )  # fmt: skip

    def cancel_started(self, server: ServerConnection) -> None:
        """A CancelRequest for `server` is on its way: `release` keeps the server until then."""
        server.cancels += 1

    def cancel_delivered(self, server: ServerConnection) -> None:
        """The CancelRequest was taken by the postmaster (or failed): release the server now if
        it was released meanwhile (the deferred half of `release`)."""
        server.cancels -= 1
        if not server.cancels and server.release_after_cancel:
            server.release_after_cancel = False
            self.release(server)

    def take_waiter(self, queued_by_ns: int | None = None) -> Waiter | None:
        """Take the first client still waiting off the queue, dropping the ones that left on the
        way; with `queued_by_ns`, only if it queued at or before then (else None, and it stays).
        The one place waiters leave the queue: a release takes one, `_fail_waiters` and the
        query_wait_timeout pass call it until it answers None."""
        waiters = self.waiters
        while waiters:
            client = waiters.popleft()  # not waiters[0] first: compiled, that is a generic call
            if client.waiting:
                if queued_by_ns is not None and client.wait_started_ns > queued_by_ns:
                    waiters.appendleft(client)  # it keeps its place; FIFO: those behind it too
                    return None
                client.waiting = False
                self.waiting -= 1
                return client
        return None

    def _fail_waiters(self, exc: PoolerError) -> None:
        """No server will come for the clients waiting now: tell each why."""
        while (client := self.take_waiter()) is not None:
            client.fail(exc)

    async def learn_spellings(self, pairs: list[tuple[str, str]]) -> None:
        """Ask a server how it reports each (name, value) of reported settings, and remember it.

        The values are set locally, so the server goes back to the pool as it was. A value
        the server refuses raises StartupParameterRejected with its error, which PostgreSQL
        itself would have answered with a FATAL one at login.
        """
        request = codec.build_query(spelling_sql(pairs, self.parameters or {}))
        errors: list[dict[str, str]] = []
        # Waits in line like a client: the maintenance pass fails the wait (QueryWaitTimeout)
        # after query_wait_timeout.
        server = await self.borrow()
        try:
            row, clean = await server.query_first_row(request, errors)
        except BaseException:
            server.close()
            raise
        self.give_back(server, clean)
        if errors:
            error = errors[0]
            raise StartupParameterRejected(
                error.get("M", "invalid startup parameter"),
                sqlstate=error.get("C"),
                detail=error.get("D"),
                hint=error.get("H"),
            )
        if row is None or len(row) != 2 * len(pairs):
            raise ServerConnectFailed("the server did not answer pypooler's settings check")
        if len(self.spellings) + len(pairs) > SPELLINGS_KEPT:
            self.spellings.clear()
        for index, pair in enumerate(pairs):
            value = row[2 * index + 1]
            # Always an entry, so the login that asked does not ask again.
            self.spellings[pair] = value.decode("utf-8", "replace") if value is not None else pair[1]

    async def borrow(self) -> ServerConnection:
        """A server for pypooler itself, waiting in line like a client; give it back with
        `release` (clean) or `close` it."""
        borrower = Borrower(self)
        server = self.checkout(borrower)
        if server is not None:
            return server
        try:
            return await borrower.future
        except asyncio.CancelledError:
            self.cancel_wait(borrower)
            raise

    def cancel_wait(self, client: Waiter) -> None:
        if client.waiting:
            client.waiting = False
            self.waiting -= 1

    def server_closed(self, server: ServerConnection) -> None:
        """A server is gone (died, or closed by us): forget it and replace it if clients wait;
        one closed by us whose connection is still open is `ending` until PostgreSQL closes it
        (this method is called again then)."""
        if server in self.servers:
            self.servers.discard(server)
            if server in self.idle:
                self.idle.remove(server)
            if server.statements is not None:
                server.statements.clear()
            if not server.lost:
                self.ending.add(server)
                server.on_close = self.server_closed
                if self.closed and server.transport is not None:
                    server.transport.close()  # shutting down: no waiting for the backend's end
                return  # no place freed yet
        else:
            self.ending.discard(server)
        self._open_servers_for_waiters()
        self._wake_siblings()

    # ------------------------------------------------------------------ opening servers

    def _open_servers_for_waiters(self) -> None:
        self._open_servers(self.waiting - self.connecting, make_room=True)

    def _open_servers(self, wanted: int, *, make_room: bool = False) -> None:
        """Open up to `wanted` servers within every bound; with `make_room`, close idle servers
        of sibling pools where only a shared bound stands in the way (see the module rules)."""
        if wanted <= 0 or self.closed or self.paused:
            return
        if self.retry_at_ns and time.monotonic_ns() < self.retry_at_ns:
            return
        size = self.size + self.reserve_size if self.reserve_open else self.size
        own = min(wanted, size - self.occupied)
        count = own
        for bound in self.bounds:
            if bound.limit:
                count = min(count, bound.room())
        for _ in range(count):
            self.connecting += 1
            self._spawn_open_server()
        if make_room and count < own:
            for bound in self.bounds:
                # Each close wakes this pool again (server_closed -> _wake_siblings), which
                # opens a server in the place made; stop once nothing more is wanted.
                while self.waiting > self.connecting and bound.limit and bound.room() <= 0:
                    if not self._close_sibling_idle(bound):
                        # Every place is lent: the siblings give one up at their next release.
                        for pool in bound.pools:
                            pool.siblings_starved = pool is not self
                        break

    def _close_sibling_idle(self, bound: SharedBound) -> bool:
        """Close the longest-idle server of another pool sharing `bound`; False if none is idle."""
        # idle is LIFO: each pool's coldest server is at the front.
        siblings = [pool for pool in bound.pools if pool is not self and pool.idle]
        if not siblings:
            return False
        coldest = min(siblings, key=lambda pool: pool.idle[0].last_used_ns)
        coldest.close_idle(coldest.idle[0])
        return True

    def _yield_to_sibling(self, server: ServerConnection) -> bool:
        """A released server no waiter here wants: close it if a sibling pool waits for room
        under a shared bound (its place goes to that sibling); else clear the flag."""
        for bound in self.bounds:
            if bound.limit and bound.room() <= 0:
                for pool in bound.pools:
                    if pool is not self and pool.waiting > pool.connecting and not pool.paused:
                        server.close()  # server_closed -> _wake_siblings -> the sibling opens one
                        return True
        self.siblings_starved = False
        return False

    def _wake_siblings(self) -> None:
        """A place under a shared bound may have freed: let the sibling pools that wait use it."""
        for bound in self.bounds:
            if bound.limit:
                for pool in list(bound.pools):
                    if pool is not self and pool.waiting > pool.connecting:
                        pool._open_servers_for_waiters()

    def _spawn_open_server(self) -> None:
        self.track_task(asyncio.get_running_loop().create_task(self._open_server()))

    def track_task(self, task: asyncio.Task[None]) -> None:
        """A connect in flight, cancelled by PoolManager.wait_closed at shutdown."""
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open_server(self) -> None:
        started = time.monotonic_ns()
        login = self.login
        try:
            server = await open_server_connection(login, self.settings.server_connect_timeout)
            if login.connect_query:  # still counted as connecting: no client gets it before
                clean = await self._run_connect_query(server, login.connect_query)
                if not clean:
                    server.close()  # left inside a transaction: never lent dirty
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
        if self.closed or server.closed or login is not self.login:
            # The pool closed, the server died, or RELOAD changed the address meanwhile.
            server.close()
            self._open_servers_for_waiters()
            return
        self.servers.add(server)
        server.on_close = self.server_closed
        server.parameters = intern_parameters(server.parameters)
        if self.rewriting:
            self.fit_stream(server, rewriting=True)
        if self.parameters is None:
            self.parameters = server.parameters
            self.tracked = frozenset(
                name.lower().encode() for name in server.parameters if name.lower() not in READ_ONLY
            )
            if self._parameters_ready is not None and not self._parameters_ready.done():
                self._parameters_ready.set_result(None)
        self.release(server)

    async def _run_connect_query(self, server: ServerConnection, sql: str) -> bool:
        """A [databases] entry's connect_query on a new server; its errors are logged, not fatal
        (as in PgBouncer). Whether the server may be lent after it (the release rule's answer)."""
        errors: list[dict[str, str]] = []
        _, clean = await server.query_first_row(codec.build_query(sql), errors)
        for error in errors:
            self.log_limiter.log(
                log, logging.WARNING, ("connect_query", self.database, self.user),
                "pool %s/%s: connect_query failed: %s", self.database, self.user, error.get("M", "?"),
            )  # fmt: skip
        return clean

    def fit_stream(self, server: ServerConnection, *, rewriting: bool) -> None:
        """Give an idle server the stream its next client speaks: a `RewritingBackend` and a
        statement LRU for transaction and statement mode, the plain tracker for session mode.
        A RELOAD that moves a pool across that line leaves clients of both kinds for a while."""
        server.rewriting = rewriting
        if server.statements is not None:
            # Give back the registry references (the server keeps the statements themselves:
            # harmless under their PYPOOLER_ names, and every later Parse of one closes it first).
            server.statements.clear()
        if rewriting:
            server.backend = RewritingBackend(server.parameter_status, self.statements.schema)
            size = self.settings.max_prepared_statements
            server.statements = ServerStatements(self.statements, size) if size else None
        else:
            server.backend = BackendStream()
            server.statements = None

    def _connect_failed(self, exc: PoolerError) -> None:
        self.last_connect_error = exc
        self.stats.server_connect_failures += 1
        self._wake_siblings()
        # Each client login may retry the server login: the same line again and again.
        self.log_limiter.log(
            log, logging.WARNING, ("server_connect", self.database, self.user, exc.reason),
            "pool %s/%s: %s", self.database, self.user, exc.message,
        )  # fmt: skip
        if self._parameters_ready is not None and not self._parameters_ready.done():
            self._parameters_ready.set_exception(exc)
            self._parameters_ready.exception()  # retrieved here; waiters re-raise it
            self._parameters_ready = None
        if self.servers or self.connecting:
            return  # servers exist or are coming; the waiters will be served by them
        retry = self.settings.server_login_retry
        if retry:
            # Like PgBouncer: keep the waiters (query_wait_timeout bounds them) and try again
            # later: the maintenance pass calls retry_connect once this time has come.
            self.retry_at_ns = time.monotonic_ns() + int(retry * NS_PER_S)
            return
        # No server can serve the waiters now: tell them why instead of leaving them hanging.
        self._fail_waiters(exc)

    def welcome_prefix(self) -> bytes:
        """AuthenticationOk and the ParameterStatus set minus application_name, built once."""
        if self._welcome is None:
            parameters = self.parameters or {}
            self._welcome = codec.AUTHENTICATION_OK + codec.build_parameter_statuses(
                {k: v for k, v in parameters.items() if k != "application_name"}
            )
        return self._welcome

    def parameter_names(self) -> dict[str, str]:
        """Lower-case names of the reported parameters, mapped to their spelling (for startup
        parameters such as `datestyle=ISO`), built once."""
        names = self._parameter_names
        if names is None:
            names = self._parameter_names = {name.lower(): name for name in self.parameters or {}}
        return names

    async def ensure_parameters(self) -> dict[str, str]:
        """The server ParameterStatus set new clients are welcomed with (opens a server if needed)."""
        while self.parameters is None:
            if self.paused:  # PgBouncer's rule: logins to a paused database wait for RESUME
                if self._resumed is None:
                    self._resumed = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._resumed)
                continue
            if self._parameters_ready is None:
                self._parameters_ready = asyncio.get_running_loop().create_future()
                if self.occupied >= self.size:
                    raise ServerConnectFailed("pool is full but has no server parameters yet")
                self.connecting += 1
                self._spawn_open_server()
            await asyncio.shield(self._parameters_ready)
        return self.parameters

    # ------------------------------------------------------------------ maintenance.py's calls

    def retire(self, servers: list[ServerConnection]) -> None:
        """Close these servers (server_lifetime): idle ones now, lent ones when they come back
        (through `draining`, like RECONNECT)."""
        for server in servers:
            server.close_needed = True
        self.draining = True
        for server in [s for s in self.idle if s.close_needed]:
            server.close()
        self._update_draining()

    def first_wait_started_ns(self) -> int:
        """When the client waiting longest began to wait (0: nobody waits)."""
        for client in self.waiters:
            if client.waiting:
                return client.wait_started_ns
        return 0

    def open_reserve(self) -> None:
        """reserve_pool_timeout has passed for a waiter: up to reserve_size more servers."""
        self.reserve_open = True
        self._open_servers_for_waiters()

    def close_reserve(self) -> None:
        """Nobody waits any more: the reserve closes, and idle servers beyond `size` with it."""
        self.reserve_open = False
        while len(self.servers) > self.size and self.idle:
            self.close_idle(self.idle[0])

    def keep_min_size(self) -> None:
        """min_pool_size: open servers up to it, within every bound (no sibling's room taken)."""
        self._open_servers(self.min_size - len(self.servers) - self.connecting)

    def check_idle(self, server: ServerConnection, sql: str, now_ns: int) -> None:
        """server_check_query on an idle server (the maintenance pass decides when): out of the
        idle list meanwhile, back (to a waiter or idle, its idle time kept) if it answers, closed
        if it does not."""
        self.idle.remove(server)
        server.checked_ns = now_ns
        self.track_task(asyncio.get_running_loop().create_task(self._check(server, sql)))

    async def _check(self, server: ServerConnection, sql: str) -> None:
        errors: list[dict[str, str]] = []
        try:
            _, clean = await server.query_first_row(codec.build_query(sql), errors)
        except PoolerError:
            clean = False  # the connection died: server_closed has forgotten it
        if server.closed:
            return
        if errors or not clean:
            self.log_limiter.log(
                log, logging.WARNING, ("server_check", self.database, self.user),
                "pool %s/%s: server_check_query failed, server closed: %s", self.database, self.user,
                errors[0].get("M", "?") if errors else "left in a transaction",
            )  # fmt: skip
            server.close()
            return
        self.release(server, server.last_used_ns)

    def abort_ending(self, closed_by_ns: int) -> None:
        """Give up waiting for the backends of servers closed at or before then: their
        connections are aborted (server_closed frees their places)."""
        for server in [s for s in self.ending if s.closing_ns <= closed_by_ns]:
            server.transport.abort()

    def cancel_ending_again(self, cancelled_by_ns: int) -> None:
        """Cancel again the queries of closed servers last cancelled at or before then and whose
        backend has not ended (see cancel_ending)."""
        for server in self.ending:
            if server.cancelled_ns and server.cancelled_ns <= cancelled_by_ns:
                self.cancel_ending(server)

    def close_idle(self, server: ServerConnection) -> None:
        """Close an idle server (server_idle_timeout); `server_closed` forgets it."""
        self.idle.remove(server)
        server.close()

    def retry_connect(self) -> None:
        """server_login_retry has passed since the last failed connect: try again for the
        waiters."""
        self.retry_at_ns = 0
        self._open_servers_for_waiters()

    def holders(self, now_ns: int) -> list[Holder]:
        """Clients and HTTP requests holding a server right now, longest hold first."""
        holders: list[Holder] = [s.client for s in self.servers if s.client is not None]
        holders += [request for request in self.http_clients if request.server is not None]
        return sorted(holders, key=lambda c: c.lent_ns)

    @property
    def client_count(self) -> int:
        """Clients in this pool, `POST /sql` requests included (SHOW POOLS, metrics)."""
        return len(self.clients) + len(self.http_clients)

    def warn_wait(self, client: Waiter, waited_ns: int, *, timed_out: bool = False) -> None:
        """Say why a client waited: name the top holders (at most one line a second per pool)."""
        now = time.monotonic_ns()
        if not timed_out and now - self._last_wait_warning_ns < NS_PER_S:
            return
        self._last_wait_warning_ns = now
        holders = self.holders(now)
        log.warning(
            "pool %s/%s: client %s app=%s %s %.0f ms for a server (pool_size %d, %d waiting);"
            " top holders: %s",
            self.database,
            self.user,
            client.peer,
            client.application_name or "-",
            "gave up after" if timed_out else "waited",
            waited_ns / 1e6,
            self.size,
            self.waiting,
            "; ".join(describe_holder(c, now) for c in holders[:3]) or "none",
        )

    def drain(self) -> None:
        """Shutdown, first step: refuse new transactions (waiters now, checkouts from here
        on) and close idle servers; lent servers are closed as their transactions end."""
        self.closed = self.draining = True
        while self.idle:
            self.idle.pop().close()
        self._fail_waiters(shutdown_refused())

    def close(self) -> None:
        self.closed = True
        self._closing = [*self.servers, *self.ending]
        if self.listener is not None:
            listener_server = self.listener.close()
            if listener_server is not None:
                self._closing.append(listener_server)
        for server in self._closing:
            server.close()
        self._fail_waiters(ShuttingDown("pypooler is shutting down"))

    # ------------------------------------------------------------------ admin console

    def pause(self) -> None:
        """Lend nothing more; close idle servers now and lent ones as they are released."""
        self.paused = self.draining = True
        while self.idle:
            self.idle.pop().close()

    def resume(self) -> None:
        self.paused = False
        self._update_draining()
        resumed = self._resumed
        if resumed is not None:
            self._resumed = None
            resumed.set_result(None)
        self._open_servers_for_waiters()

    @property
    def drained(self) -> bool:
        """No server open, connecting or ending: what PAUSE waits for."""
        return not self.servers and not self.connecting and not self.ending

    def reconnect(self) -> None:
        """Close every server: idle ones now, lent ones when released (new ones open as needed);
        the listener connection is reopened at once."""
        if self.listener is not None:
            self.listener.reconnect()
        for server in self.servers:
            server.close_needed = True
        self.draining = True
        for server in list(self.idle):
            server.close()
        self._update_draining()

    @property
    def close_pending(self) -> bool:
        """Some server is marked close_needed and not closed yet: what WAIT_CLOSE waits for."""
        return any(server.close_needed for server in self.servers)

    def kill(self, error: PoolerError) -> None:
        """KILL: end every client with `error` and close every server; the pool stays paused."""
        self.pause()
        for client in list(self.clients):
            client.fail(error)  # its connection ends at the next loop iteration
        for server in list(self.servers):
            # A lent server may be running its client's query: cancelled as it closes.
            self.give_back(server, False, busy=server.client is not None)

    def reconfigure(self, login: ServerLogin, *, size: int, mode: PoolMode, settings: Settings) -> None:
        """RELOAD: take a new server address, bound, mode and settings.

        Servers logged in with the old address or beyond the new bound are closed when released
        (idle ones at once); a larger bound serves the waiters at once.
        """
        self.settings = settings
        self.wait_warn_ns = settings.wait_warn_ms * 1e6
        self.welcomes.clear()  # ignore_startup_parameters may have changed
        self.spellings.clear()  # the server may have changed
        self.stats.max_applications = settings.stats_max_applications
        self.stats.max_statements = settings.stats_max_statements
        if mode != self.mode:
            self.mode = mode
            # New clients get the stream kind of the new mode; servers are refitted when lent.
            self.rewriting = mode != "session"
            # Clients with a rewriting stream can run in any mode; a session-mode client's
            # statements and settings are on its server only, so it keeps session mode.
            for client in self.clients:
                if client.rewriter is not None:
                    client.mode = mode
        if _login_key(login) != _login_key(self.login):
            self.login = login
            for server in self.servers:
                server.close_needed = True
            if self.listener is not None:
                self.listener.reconnect()
        else:
            # Same server and configured secret: keep what clients taught the login (a
            # password, a SCRAM ClientKey), take a TLS context rebuilt from the files.
            self.login.ssl_context = login.ssl_context
            self.login.keepalive = login.keepalive
        self.size = size
        excess = len(self.servers) - size
        if excess > 0:
            # Idle ones first (the coldest, at the front); then lent ones when released.
            for server in self.idle[:excess]:
                server.close_needed = True
            excess -= min(excess, len(self.idle))
            for server in self.servers:
                if excess <= 0:
                    break
                if not server.close_needed:
                    server.close_needed = True
                    excess -= 1
        if any(server.close_needed for server in self.servers):
            self.draining = True
            for server in [s for s in self.idle if s.close_needed]:
                server.close()
        self._open_servers_for_waiters()

    def _retire(self, server: ServerConnection) -> bool:
        """Close a released server that must not be lent again; False if it may be."""
        if not (self.paused or self.closed or server.close_needed):
            self._update_draining()  # what needed closing went away by itself
            return False
        server.close()  # server_closed() forgets it and may open a replacement for waiters
        self._update_draining()
        return True

    def _update_draining(self) -> None:
        self.draining = self.paused or self.closed or self.close_pending

    def take_snapshot(self) -> None:
        self.snapshots.append(Snapshot(self.stats))
        del self.snapshots[:-SNAPSHOTS_KEPT]


def _login_key(login: ServerLogin) -> tuple[object, ...]:
    return login.config_key()


def describe_holder(client: Holder, now_ns: int) -> str:
    """One holder for a log line: who, for how long, doing what."""
    held_ms = (now_ns - client.lent_ns) / 1e6
    if client.idle_since_ns and client.idle_in_xact:
        state = f"idle in transaction {(now_ns - client.idle_since_ns) / 1e6:.0f} ms"
    elif client.idle_since_ns:
        state = "idle"
    else:
        state = "active"
    statement = statement_text(client.frontend.last_statement)
    return (
        f"{client.peer} app={client.application_name or '-'} held {held_ms:.0f} ms, {state},"
        f" last statement: {statement!r}"
    )


class PoolManager:
    """Finds or creates the pool for a (database, user) from the configuration.

    `stored_secret(user)` (auth_file) supplies server login secrets that [databases] does not.

    Also holds the admin console's per-database states, so a pool created later (a new user of
    a paused database) starts in the same state: `paused_all` / `paused_databases` (PAUSE, KILL)
    and `disabled` (DISABLE: new logins refused).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stored_secret: Callable[[str], Secret | None] | None = None,
        server_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.pools: dict[tuple[str, str], Pool] = {}
        self.auto_pools = 0  # pools with `auto` set (see max_auto_pools)
        self.host_lists: dict[str, HostList] = {}  # per [databases] entry with several hosts
        # max_db_connections per database name, max_user_connections per server user (SharedBound).
        self.database_bounds: dict[str, SharedBound] = {}
        self.user_bounds: dict[str, SharedBound] = {}
        self.stored_secret = stored_secret
        # Built once: loading CA files per connection would cost more than the login.
        self.server_tls = server_tls if server_tls is not None else server_ssl_context(settings)
        self.paused_all = False
        self.paused_databases: set[str] = set()
        self.disabled: set[str] = set()
        # Per PostgreSQL database (host, port, dbname): schema changes seen, for every pool of it.
        self.schemas: dict[tuple[str, int, str], SchemaVersion] = {}
        self.log_limiter = LogLimiter()  # flushed by the maintenance pass (maintenance.py)

    def database_config(self, database: str) -> tuple[str, DatabaseConfig] | None:
        """The [databases] entry serving `database`: its own, else the '*' fallback."""
        databases = self.settings.databases
        if database in databases:
            return database, databases[database]
        if "*" in databases:
            return "*", databases["*"]
        return None

    def admit(self, database: str) -> DatabaseConfig:
        """The entry a login for `database` uses; DatabaseDisabled (DISABLE) or NoSuchDatabase
        refuses it. Every transport's login asks here (client.py, sql_over_http.py)."""
        if database in self.disabled:
            raise DatabaseDisabled(
                f'database "{database}" does not allow connections now',
                hint="an administrator ran DISABLE on the admin console; ENABLE allows them again",
            )
        found = self.database_config(database)
        if found is None:
            raise NoSuchDatabase(f'no such database: "{database}"')
        return found[1]

    def get_pool(self, database: str, client_user: str) -> Pool | None:
        found = self.database_config(database)
        if found is None:
            return None
        entry, db = found
        return self._pool(database, entry, db, db.user or client_user)

    def auth_pool(self, database: str) -> Pool | None:
        """The pool auth_query runs in: database `database`, logged in as auth_user."""
        found = self.database_config(database)
        auth_user = self.settings.auth_user_for(database)
        if found is None or not auth_user:
            return None
        entry, db = found
        return self._pool(database, entry, db, auth_user)

    def _server_login(self, database: str, entry: str, db: DatabaseConfig, user: str) -> ServerLogin:
        # [databases] password belongs to the forced user (or to every user when none is forced).
        password = db.password if db.user in (None, user) else None
        secret = None
        if password is None and self.stored_secret is not None:
            secret = self.stored_secret(user)
        settings = self.settings
        targets = db.targets()
        hosts = None
        if len(targets) > 1:
            hosts = self.host_lists.get(entry)
            if hosts is None or hosts.targets != targets:
                hosts = self.host_lists[entry] = HostList(
                    targets,
                    round_robin=db.load_balance_hosts == "round-robin",
                    down_s=settings.host_down_timeout,
                    target_session_attrs=db.target_session_attrs,
                )
            else:  # a RELOAD: the rotation and the down marks go on
                hosts.round_robin = db.load_balance_hosts == "round-robin"
                hosts.down_s = settings.host_down_timeout
                hosts.target_session_attrs = db.target_session_attrs
        host, port = targets[0]
        return ServerLogin(
            host,
            port,
            db.dbname or database,
            user,
            password,
            secret=secret,
            tls_mode=settings.server_tls_sslmode,
            ssl_context=self.server_tls,
            keepalive=keepalive_options(settings),
            startup=db.startup_parameters(),
            connect_query=db.connect_query or "",
            hosts=hosts,
        )

    def _pool(self, database: str, entry: str, db: DatabaseConfig, user: str) -> Pool:
        key = (database, user)
        pool = self.pools.get(key)
        if pool is None:
            auto = entry == "*" or db.user is None
            if auto and self.auto_pools >= self.settings.max_auto_pools and not self._make_room():
                raise TooManyPools(
                    f"no pool for {database}/{user}: max_auto_pools ({self.settings.max_auto_pools})"
                    " pools for unconfigured databases or users are in use",
                    hint="configure the database with a user (one pool for all its clients),"
                    " or raise max_auto_pools",
                )
            login = self._server_login(database, entry, db, user)
            pool = Pool(
                database,
                user,
                login,
                size=self.settings.pool_size_of(db, user),
                mode=self.settings.pool_mode_of(db, user),
                settings=self.settings,
                schema=self.schemas.setdefault((login.host, login.port, login.database), SchemaVersion()),
                log_limiter=self.log_limiter,
            )
            if self.is_paused(database):
                pool.pause()
            if auto:
                pool.auto = True
                self.auto_pools += 1
            self._apply_limits(pool, db)
            self.pools[key] = pool
            log.debug("new pool %s/%s -> %s (entry %s)", database, user, login.describe(), entry)
        return pool

    async def run_auth_query(self, database: str, user: str) -> str | None:
        """auth_query for `user` on a server of the auth pool: the secret text, or None when the
        user is unknown or has no password. AuthLookupFailed when it cannot be run."""
        pool = self.auth_pool(database)
        if pool is None:
            raise AuthLookupFailed(f"auth_query cannot run: no database {database!r} or no auth_user")
        request = codec.build_parameterized_query(self.settings.auth_query, [user])
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout):
                server = await pool.borrow()
                try:
                    row, clean = await server.query_first_row(request)
                except BaseException:
                    server.close()
                    raise
        except TimeoutError:
            raise AuthLookupFailed(
                f"auth_query for user {user!r} timed out after {self.settings.server_connect_timeout:g} s"
            ) from None
        except AuthLookupFailed:
            raise
        except PoolerError as exc:
            failure = AuthLookupFailed(f"auth_query for user {user!r} failed: {exc.message}")
            failure.log_detail = exc.detail
            raise failure from None
        pool.give_back(server, clean)
        if not row or row[-1] is None:
            return None
        try:
            return row[-1].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def reload(
        self,
        settings: Settings,
        *,
        stored_secret: Callable[[str], Secret | None] | None = None,
        server_tls: ssl.SSLContext | None = None,
    ) -> list[str]:
        """Use `settings` from now on (SIGHUP and RELOAD): see `apply_settings`; returns a line
        per pool whose server address or bound changed, for the log."""
        before = {key: (_login_key(p.login), p.size) for key, p in self.pools.items()}
        if stored_secret is not None:
            self.stored_secret = stored_secret
        if server_tls is not None or settings.server_tls_sslmode == "disable":
            self.server_tls = server_tls
        self.apply_settings(settings)
        return [
            f"pool {db}/{user}: "
            + (
                "server changed"
                if before[(db, user)][0] != _login_key(p.login)
                else f"pool_size {before[(db, user)][1]} -> {p.size}"
            )
            for (db, user), p in self.pools.items()
            if before[(db, user)] != (_login_key(p.login), p.size)
        ]

    def make_min_pools(self) -> None:
        """The pools of entries with a forced user and a min_pool_size exist from the start (and
        from the RELOAD that adds them), so the maintenance pass opens their servers before the
        first client comes, as PgBouncer does."""
        for name, db in self.settings.databases.items():
            if name != "*" and db.user and self.settings.pool_limits(db)[0]:
                self.get_pool(name, db.user)

    def remove_unused(self, unused_since_ns: int) -> int:
        """Remove the automatic pools unused since `unused_since_ns` or before (autodb_idle_timeout,
        decided by the maintenance pass); return how many. They leave SHOW POOLS and /metrics."""
        removed = [
            key
            for key, pool in self.pools.items()
            if pool.auto and pool.unused_since_ns and pool.unused_since_ns <= unused_since_ns and pool.unused
        ]
        for key in removed:
            self._remove(key)
        return len(removed)

    def _make_room(self) -> bool:
        """At max_auto_pools: remove the automatic pool unused the longest, if any is unused."""
        unused = [
            (pool.unused_since_ns, key) for key, pool in self.pools.items() if pool.auto and pool.unused
        ]
        if not unused:
            return False
        self._remove(min(unused)[1])
        return True

    def _remove(self, key: tuple[str, str]) -> None:
        pool = self.pools.pop(key)
        self.auto_pools -= 1
        pool.close()
        for bounds, name in ((self.database_bounds, pool.database), (self.user_bounds, pool.user)):
            bound = bounds[name]
            bound.pools.discard(pool)
            if not bound.pools:
                del bounds[name]
        schema = (pool.login.host, pool.login.port, pool.login.database)
        if not any((p.login.host, p.login.port, p.login.database) == schema for p in self.pools.values()):
            self.schemas.pop(schema, None)
        log.debug("removed unused pool %s/%s", pool.database, pool.user)

    def drain(self) -> None:
        for pool in self.pools.values():
            pool.drain()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    async def wait_closed(self, deadline: float) -> None:
        """After close(): cancel in-flight connects, wait (until loop time `deadline`) for them to
        unwind and for closed servers to be gone (a TLS close needs a few round trips), then
        abort stragglers, so the loop can be closed with no transport left."""
        loop = asyncio.get_running_loop()
        opening = [task for pool in self.pools.values() for task in pool._opening]
        for task in opening:
            task.cancel()
        if opening:
            await asyncio.wait(opening, timeout=max(0.0, deadline - loop.time()))

        def still_open() -> list[ServerConnection]:
            # Servers closed meanwhile (clients ending as the pooler stops) join `ending`.
            pools = self.pools.values()
            return [s for pool in pools for s in (*pool._closing, *pool.ending) if not s.lost]

        while still_open() and loop.time() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL_S)
        for server in still_open():
            if server.transport is not None:
                server.transport.abort()

    # ------------------------------------------------------------------ admin console

    def databases(self) -> list[str]:
        """Database names clients can ask for by name: configured entries, then pools served
        by the '*' fallback."""
        names = [name for name in self.settings.databases if name != "*"]
        for database, _ in self.pools:
            if database not in names:
                names.append(database)
        return names

    def pools_of(self, database: str | None) -> list[Pool]:
        """The pools of one database, or of all when `database` is None."""
        return [p for p in self.pools.values() if database is None or p.database == database]

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused_databases

    def pause(self, database: str | None) -> list[Pool]:
        """PAUSE: the pools now draining (PAUSE returns when they are drained)."""
        if database is None:
            self.paused_all = True
        else:
            self.paused_databases.add(database)
        pools = self.pools_of(database)
        for pool in pools:
            pool.pause()
        return pools

    def resume(self, database: str | None) -> None:
        if database is None:
            self.paused_all = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)
        for pool in self.pools_of(database):
            if not self.is_paused(pool.database):
                pool.resume()

    def kill(self, database: str, error: PoolerError) -> None:
        """KILL: close the database's clients and servers; it stays paused until RESUME."""
        self.paused_databases.add(database)
        for pool in self.pools_of(database):
            pool.kill(error)

    def reconnect(self, database: str | None) -> list[Pool]:
        pools = self.pools_of(database)
        for pool in pools:
            pool.reconnect()
        return pools

    def apply_settings(self, settings: Settings) -> None:
        """RELOAD: new settings for every pool; new databases work from the next login.

        Pools whose database left the configuration (or now logs in as another user) keep
        serving the clients they have while new logins go elsewhere, so a RELOAD never cuts
        connections by itself.
        """
        self.settings = settings
        for (database, user), pool in self.pools.items():
            found = self.database_config(database)
            if found is None or (found[1].user is not None and found[1].user != user):
                pool.settings = settings  # no longer reachable: new logins go elsewhere
                pool.wait_warn_ns = settings.wait_warn_ms * 1e6
                continue
            entry, db = found
            self._apply_limits(pool, db)
            pool.reconfigure(
                self._server_login(database, entry, db, user),
                size=settings.pool_size_of(db, user),
                mode=settings.pool_mode_of(db, user),
                settings=settings,
            )

    def _apply_limits(self, pool: Pool, db: DatabaseConfig) -> None:
        """min_pool_size, reserve_pool and the shared bounds of `pool`, from its entry (else the
        defaults); a RELOAD calls it again with the new ones."""
        settings = self.settings
        pool.min_size, pool.reserve_size, db_limit = settings.pool_limits(db)
        by_database = self.database_bounds.setdefault(pool.database, SharedBound(pool.database, 0))
        by_database.limit = db_limit
        by_user = self.user_bounds.setdefault(pool.user, SharedBound(pool.user, 0))
        by_user.limit = settings.max_user_connections_of(pool.user)
        pool.bounds = (by_database, by_user)
        by_database.pools.add(pool)
        by_user.pools.add(pool)

    def take_snapshots(self) -> None:
        for pool in self.pools.values():
            pool.take_snapshot()
