"""Asking PostgreSQL what held servers are doing, on connections of the advisor's own.

The maintenance pass picks the holders held longer than `holder_diagnosis_ms` and, at most once
per pass, starts a round of questions (`ActivityWatch.start`); SHOW ADVICE may ask for one too
(`refresh`). The answers (`ActivityReport`s, one per PostgreSQL server) are kept for whoever
classifies holders next (holders.py): the console, the metrics, the pass's hog lines.

Rules:
- One connection per (PostgreSQL server address, server user), opened with a pool's login by
  `open_server_connection`: outside every pool's bound and never a pool slot, so an exhausted
  pool can still be diagnosed. It is reused across rounds, closed once unused for
  ADVISOR_IDLE_CLOSE_S (the pass decides: `close_unused`), and dropped when a question fails
  or outlasts ASK_TIMEOUT_S (its state is then unknown). The server's max_connections
  (`limits`) is asked on the same connections, and one opened only for it is closed at once.
- One question at a time per connection; a round is one task, at most one runs, and a new one
  starts at most every MIN_ROUND_GAP_S (pg_blocking_pids takes the lock manager's locks for a
  moment). Nothing awaits a round on the pass's behalf: a slow or failing server never delays
  the pass, it only leaves the holders classified from the pool's own view.
- Nothing here runs per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pypooler.holders import ActivityReport, activity_query, parse_activity
from pypooler.log_limits import LogLimiter
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import PoolerError, ServerConnectFailed, ServerLoginFailed
from pypooler.server import ServerConnection, ServerLogin, open_server_connection
from pypooler.stats import NS_PER_S

if TYPE_CHECKING:
    from pypooler.pool import Holder, Pool

log = logging.getLogger("pypooler.advisor")

ASK_TIMEOUT_S: Final = 2.0  # a question PostgreSQL has not answered by then is abandoned
MIN_ROUND_GAP_S: Final = 1.0  # rounds of questions start at most this often
ADVISOR_IDLE_CLOSE_S: Final = 60.0  # an advisor connection unused this long is closed
LIMITS_TTL_S: Final = 60.0  # how long a server's max_connections answer is reused
# Names the advisor's backend in pg_stat_activity, set once per connection.
APPLICATION_NAME: Final = "pypooler advisor"

Row = list[bytes | None]


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int
    reserved_connections: int  # superuser_reserved_connections (+ reserved_connections on 16+)

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved_connections


class _AdvisorConnection:
    __slots__ = ("last_used_ns", "lock", "named", "server")

    def __init__(self) -> None:
        self.server: ServerConnection | None = None
        self.lock = asyncio.Lock()  # one question at a time; held while connecting too
        self.last_used_ns = 0
        self.named = False  # application_name set


class ActivityWatch:
    """The advisor's connections, its latest answers, and the round in flight."""

    def __init__(
        self,
        connect_timeout: float,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        log_limiter: LogLimiter | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.clock = clock
        # A server that stays unreachable would otherwise be logged at every round.
        self.log_limiter = log_limiter if log_limiter is not None else LogLimiter()
        self.reports: dict[tuple[str, int], ActivityReport] = {}
        self._connections: dict[tuple[str, int, str], _AdvisorConnection] = {}
        self._limits: dict[tuple[str, int], tuple[int, ServerLimits]] = {}
        self._round: asyncio.Task[None] | None = None
        self._round_started_ns = -(1 << 62)
        self.rounds = 0  # rounds started (tests, and the rule of one per pass)
        self.answers = 0  # answers received: the pass's hog lines look at each new one once
        self.closed = False

    # ------------------------------------------------------------------ rounds

    def due(self, now_ns: int) -> bool:
        """No round in flight and none started within MIN_ROUND_GAP_S."""
        idle = self._round is None or self._round.done()
        return idle and now_ns - self._round_started_ns >= MIN_ROUND_GAP_S * NS_PER_S

    def start(self, holders: list[tuple[Pool, Holder]], now_ns: int) -> asyncio.Task[None] | None:
        """Start a round about these holders' backends (the pass checked `due`)."""
        asks: dict[tuple[tuple[str, int], str], tuple[ServerLogin, set[int]]] = {}
        for pool, client in holders:
            server = client.server
            if server is None or not server.process_id:
                continue
            _, pids = asks.setdefault((server.address, pool.login.user), (pool.login, set()))
            pids.add(server.process_id)
        if not asks:
            return None
        self._round_started_ns = now_ns
        self.rounds += 1
        self._round = asyncio.get_running_loop().create_task(self._ask_all(asks))
        return self._round

    async def refresh(self, holders: list[tuple[Pool, Holder]]) -> None:
        """SHOW ADVICE: start a round if one is due, and wait up to ASK_TIMEOUT_S for the round
        in flight (a connect may take longer; the advice then goes with the answers it has)."""
        now = self.clock()
        if holders and self.due(now):
            self.start(holders, now)
        round_ = self._round
        if round_ is not None and not round_.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(round_), ASK_TIMEOUT_S)

    async def _ask_all(self, asks: dict[tuple[tuple[str, int], str], tuple[ServerLogin, set[int]]]) -> None:
        await asyncio.gather(
            *(self._ask(login, address, pids) for (address, _), (login, pids) in asks.items())
        )

    async def _ask(self, login: ServerLogin, address: tuple[str, int], pids: set[int]) -> None:
        taken_ns = self.clock()  # the answer shows the backends at this moment or later
        rows = await self.query(login, address, activity_query(pids))
        if rows is None:
            return
        try:
            found = parse_activity(rows)
        except ValueError as exc:  # a row not as asked: say so, keep the last good answer
            log.warning("advisor: unexpected pg_stat_activity row from %s:%d: %s", *address, exc)
            return
        self.reports[address] = ActivityReport(address, taken_ns, found)
        self.answers += 1

    # ------------------------------------------------------------------ questions

    async def query(
        self, login: ServerLogin, address: tuple[str, int], sql: str, *, keep: bool = True
    ) -> list[Row] | None:
        """The rows of `sql` on the advisor's connection to `address` as `login.user`; None (and
        the connection dropped) if it cannot be opened or does not answer in time. `keep`
        False: a connection opened for this question is closed after it."""
        if self.closed:
            return None
        key = (*address, login.user)
        connection = self._connections.get(key)
        if connection is None:
            connection = self._connections[key] = _AdvisorConnection()
        async with connection.lock:
            keep = keep or connection.server is not None
            try:
                server = connection.server
                if server is None or server.closed:
                    connection.named = False
                    server = connection.server = await open_server_connection(
                        login_at(login, address), self.connect_timeout
                    )
                text = sql if connection.named else f"set application_name = '{APPLICATION_NAME}'; {sql}"
                async with asyncio.timeout(ASK_TIMEOUT_S):
                    rows = await _rows(server, text)
                connection.named = True
            except (PoolerError, TimeoutError) as exc:
                reason = (
                    exc.message if isinstance(exc, PoolerError) else f"no answer within {ASK_TIMEOUT_S:g} s"
                )
                self.log_limiter.log(
                    log, logging.INFO, ("advisor", address, login.user),
                    "advisor: cannot ask %s@%s:%d: %s", login.user, *address, reason,
                )  # fmt: skip
                self._drop(connection)
                return None
            connection.last_used_ns = self.clock()
            if not keep:
                self._drop(connection)
            return rows

    @staticmethod
    def _drop(connection: _AdvisorConnection) -> None:
        """Close its server; the entry stays for whoever waits on its lock (close_unused
        removes it)."""
        if connection.server is not None:
            connection.server.close()
            connection.server = None

    async def limits(self, login: ServerLogin) -> ServerLimits | None:
        """max_connections and the reserved slots of the login's (first) server, cached."""
        address = (login.host, login.port)
        cached = self._limits.get(address)
        now = self.clock()
        if cached is not None and now - cached[0] < LIMITS_TTL_S * NS_PER_S:
            return cached[1]
        # Asked at start-up and by SHOW ADVICE: no connection is kept open for it alone.
        rows = await self.query(
            login,
            address,
            "select current_setting('max_connections'), current_setting('superuser_reserved_connections'),"
            " coalesce(current_setting('reserved_connections', true), '0')",
            keep=False,
        )
        if not rows:
            return None
        values = [int(value or b"0") for value in rows[0]]
        limits = ServerLimits(values[0], values[1] + values[2])
        self._limits[address] = (now, limits)
        return limits

    # ------------------------------------------------------------------ closing

    def close_unused(self, unused_since_ns: int) -> None:
        """Close connections unused since then (the maintenance pass's decision)."""
        for key, connection in list(self._connections.items()):
            # Nobody can be waiting for an unlocked lock: asyncio.Lock takes a free one at once.
            if not connection.lock.locked() and connection.last_used_ns <= unused_since_ns:
                self._drop(connection)
                del self._connections[key]

    def close(self) -> None:
        """Shutdown: the round in flight cancelled, every connection closed, no new one."""
        self.closed = True
        if self._round is not None:
            self._round.cancel()
        for connection in self._connections.values():
            self._drop(connection)
        self._connections.clear()


def login_at(login: ServerLogin, address: tuple[str, int]) -> ServerLogin:
    """The login itself, or (an entry with several hosts) the same login for one of them."""
    if login.hosts is None and (login.host, login.port) == address:
        return login
    copy = ServerLogin(
        address[0], address[1], login.database, login.user, login.password, secret=login.secret,
        tls_mode=login.tls_mode, ssl_context=login.ssl_context, keepalive=login.keepalive,
        startup=login.startup,
    )  # fmt: skip
    copy.client_key = login.client_key
    return copy


async def _rows(server: ServerConnection, sql: str) -> list[Row]:
    """Every DataRow `sql` returns; ServerLoginFailed with the server's message on an error
    (as ServerConnection.query_first_row), ServerConnectFailed if the connection dies."""
    done: asyncio.Future[list[Row]] = asyncio.get_running_loop().create_future()
    rows: list[Row] = []
    error: dict[str, str] | None = None

    def on_message(msg_type: int, body: bytes) -> bool:
        nonlocal error
        if done.done():
            return True
        if msg_type == 0:
            done.set_exception(ServerConnectFailed("the advisor's server connection closed"))
            return True
        if msg_type == c.B_DATA_ROW:
            rows.append(codec.parse_data_row(body))
        elif msg_type == c.B_ERROR_RESPONSE:
            error = codec.parse_error_fields(body)
        elif msg_type == c.B_READY_FOR_QUERY:
            if error is not None:
                done.set_exception(
                    ServerLoginFailed(
                        f"query failed: {error.get('M', 'unknown error')}", sqlstate=error.get("C")
                    )
                )
            else:
                done.set_result(rows)
            return True
        return False

    server.run_internal(sql, on_message)
    return await done
