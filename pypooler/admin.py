"""The admin console: the virtual database `pgbouncer` (alias `pypooler`), PgBouncer-compatible.

A client whose startup packet names one of those databases is handed over by `ClientConnection`
(through `ClientRegistry.admin_login`) to an `AdminConnection`, which answers simple-protocol
queries itself and never touches a server.

Rules:
- Who: users in `admin_users` may run everything; users in `stats_users` may only SHOW; anyone
  else gets FATAL 28000 at login.
- The SHOW commands PgBouncer has answer with PgBouncer 1.18's column names, order and type OIDs
  (tests/fixtures/pgbouncer_1_18_columns.json was captured from a real one) and its units
  (STATS times in microseconds, bytes, maxwait in seconds plus maxwait_us), so
  pgbouncer_exporter and existing dashboards read pypooler unchanged. Columns PgBouncer has and
  pypooler has no meaning for (cancel-request states, DNS lists) are sent as 0.
- pypooler's own SHOWs (TOP_STATEMENTS, HOLDERS, LISTENERS, ADVICE) put the unit in each column name.
- Commands are read case-insensitively, with or without a trailing ';'. An unknown or malformed
  command is an ERROR (42601) naming the valid ones; the session goes on.
- Simple Query only. Extended-protocol messages get one ERROR each batch, then ReadyForQuery at
  the batch's Sync, as PostgreSQL does after an error.
- Reading the pools happens on the event loop between callbacks, so every SHOW sees one
  consistent moment; nothing here runs on the forwarding path.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from pypooler import __version__
from pypooler.activity import ActivityWatch
from pypooler.advisor import advice_table
from pypooler.config import RESTART_ONLY_SETTINGS, ConfigError, Settings
from pypooler.holders import diagnose_all, statement_text
from pypooler.pool import Pool, PoolManager
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import (
    AdminCommandError,
    AdminInvalidValue,
    AdminNotAllowed,
    AdminPermissionDenied,
    AdminUnsupported,
    KilledByAdmin,
    PoolerError,
    ProtocolViolation,
    build_notice_response,
)
from pypooler.stats import TrafficStats
from pypooler.websocket import transport_name

if TYPE_CHECKING:
    from pypooler.client import ClientConnection
    from pypooler.registry import ClientRegistry

log = logging.getLogger("pypooler.admin")

TEXT: Final = c.OID_TEXT
INT4: Final = c.OID_INT4
INT8: Final = c.OID_INT8
NUMERIC: Final = c.OID_NUMERIC

Column = tuple[str, int]
Row = list[str | None]

# How often PAUSE and WAIT_CLOSE look whether the servers they wait for are gone. Polling keeps
# the pool free of waiter bookkeeping for a command an operator runs a few times a year.
DRAIN_POLL_S: Final = 0.02
# What the console says it is in ParameterStatus (client libraries insist on some of these:
# lib/pq refuses a client_encoding other than UTF8 and a DateStyle not starting with ISO).
CONSOLE_PARAMETERS: Final = {
    "server_version": f"{__version__}/pypooler",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
}
_EXTENDED_PROTOCOL: Final = frozenset((c.F_PARSE, c.F_BIND, c.F_DESCRIBE, c.F_EXECUTE, c.F_CLOSE, c.F_FLUSH))
_COPY_MESSAGES: Final = frozenset((c.F_COPY_DATA, c.F_COPY_DONE, c.F_COPY_FAIL))

# --------------------------------------------------------------------------- columns
# PgBouncer 1.18's, exactly (names, order, type OIDs).

POOLS_COLUMNS: Final[Sequence[Column]] = (
    ("database", TEXT), ("user", TEXT), ("cl_active", INT4), ("cl_waiting", INT4),
    ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4), ("sv_active", INT4),
    ("sv_active_cancel", INT4), ("sv_being_canceled", INT4), ("sv_idle", INT4), ("sv_used", INT4),
    ("sv_tested", INT4), ("sv_login", INT4), ("maxwait", INT4), ("maxwait_us", INT4),
    ("pool_mode", TEXT),
)  # fmt: skip
_STAT_NAMES: Final = (
    "xact_count", "query_count", "received", "sent", "xact_time", "query_time", "wait_time",
)  # fmt: skip
_AVERAGE_NAMES: Final = (
    "xact_count", "query_count", "recv", "sent", "xact_time", "query_time", "wait_time",
)  # fmt: skip
STATS_COLUMNS: Final[Sequence[Column]] = (
    ("database", TEXT),
    *((f"total_{name}", NUMERIC) for name in _STAT_NAMES),
    *((f"avg_{name}", NUMERIC) for name in _AVERAGE_NAMES),
)
# STATS_TOTALS and STATS_AVERAGES name their columns alike, without total_/avg_.
STATS_PART_COLUMNS: Final[Sequence[Column]] = (
    ("database", TEXT), ("xact_count", NUMERIC), ("query_count", NUMERIC),
    ("bytes_received", NUMERIC), ("bytes_sent", NUMERIC), ("xact_time", NUMERIC),
    ("query_time", NUMERIC), ("wait_time", NUMERIC),
)  # fmt: skip
TOTALS_COLUMNS: Final[Sequence[Column]] = (("name", TEXT), ("value", NUMERIC))
CONNECTION_COLUMNS: Final[Sequence[Column]] = (
    ("type", TEXT), ("user", TEXT), ("database", TEXT), ("state", TEXT), ("addr", TEXT),
    ("port", INT4), ("local_addr", TEXT), ("local_port", INT4), ("connect_time", TEXT),
    ("request_time", TEXT), ("wait", INT4), ("wait_us", INT4), ("close_needed", INT4),
    ("ptr", TEXT), ("link", TEXT), ("remote_pid", INT4), ("tls", TEXT),
    ("application_name", TEXT), ("transport", TEXT),
)  # fmt: skip
DATABASES_COLUMNS: Final[Sequence[Column]] = (
    ("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT), ("force_user", TEXT),
    ("pool_size", INT4), ("min_pool_size", INT4), ("reserve_pool", INT4), ("pool_mode", TEXT),
    ("max_connections", INT4), ("current_connections", INT4), ("paused", INT4),
    ("disabled", INT4),
)  # fmt: skip
USERS_COLUMNS: Final[Sequence[Column]] = (
    ("name", TEXT), ("pool_mode", TEXT), ("max_user_connections", INT4), ("current_connections", INT4),
)  # fmt: skip
CONFIG_COLUMNS: Final[Sequence[Column]] = (
    ("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT),
)  # fmt: skip
VERSION_COLUMNS: Final[Sequence[Column]] = (("version", TEXT),)
LISTS_COLUMNS: Final[Sequence[Column]] = (("list", TEXT), ("items", INT4))

# pypooler's own.
TOP_STATEMENTS_COLUMNS: Final[Sequence[Column]] = (
    ("database", TEXT), ("user", TEXT), ("count", INT8), ("total_hold_ms", NUMERIC),
    ("avg_hold_ms", NUMERIC), ("p50_hold_ms", NUMERIC), ("p99_hold_ms", NUMERIC),
    ("total_idle_in_xact_ms", NUMERIC), ("statement", TEXT),
)  # fmt: skip
HOLDERS_COLUMNS: Final[Sequence[Column]] = (
    ("database", TEXT), ("user", TEXT), ("client_addr", TEXT), ("application_name", TEXT),
    ("state", TEXT), ("held_ms", NUMERIC), ("idle_ms", NUMERIC), ("server_pid", INT4),
    ("last_statement", TEXT), ("diagnosis", TEXT), ("wait_event", TEXT), ("blocked_by", TEXT),
)  # fmt: skip

LISTENERS_COLUMNS: Final[Sequence[Column]] = (
    ("database", TEXT), ("user", TEXT), ("state", TEXT), ("server_pid", INT4), ("channels", INT4),
    ("listening_clients", INT4), ("delivered", INT8), ("dropped", INT8), ("reconnects", INT4),
)  # fmt: skip


@dataclass(slots=True)
class ResultSet:
    columns: Sequence[Column]
    rows: list[Row]

    def encode(self) -> bytes:
        return (
            codec.build_row_description(self.columns)
            + b"".join(codec.build_data_row(row) for row in self.rows)
            + codec.build_command_complete("SHOW")
        )


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    """One console command: `verb` upper-cased; `argument` is SHOW's subject (upper-cased) or a
    database name (as given, double quotes removed)."""

    verb: str
    argument: str | None = None


# verb -> whether a database name is required (True), optional (False); None: no argument.
DATABASE_COMMANDS: Final[dict[str, bool | None]] = {
    "PAUSE": False, "RESUME": False, "RECONNECT": False, "WAIT_CLOSE": False,
    "KILL": True, "DISABLE": True, "ENABLE": True, "RELOAD": None, "SHUTDOWN": None,
}  # fmt: skip
SHOW_SUBJECTS: Final = (
    "POOLS", "STATS", "STATS_TOTALS", "STATS_AVERAGES", "TOTALS", "CLIENTS", "SERVERS",
    "DATABASES", "USERS", "CONFIG", "VERSION", "LISTS", "TOP_STATEMENTS", "HOLDERS", "LISTENERS",
    "ADVICE",
    "HELP",
)  # fmt: skip
VALID_COMMANDS: Final = (
    f"SHOW {{{'|'.join(SHOW_SUBJECTS)}}}; PAUSE [db]; RESUME [db]; RECONNECT [db];"
    " WAIT_CLOSE [db]; KILL db; DISABLE db; ENABLE db; RELOAD; SHUTDOWN"
)


def parse_commands(text: str) -> list[Command]:
    """The commands in one Query message ('SHOW POOLS;' or 'pause app; resume app').

    Raises AdminCommandError for anything that is not a console command.
    """
    return [parse_command(part) for part in text.split(";") if part.strip()]


def parse_command(text: str) -> Command:
    words = text.split()
    if not words:
        raise AdminCommandError("empty admin console command")
    verb = words[0].upper()
    rest = words[1:]
    if verb == "SHOW":
        if len(rest) == 1 and rest[0].upper() in SHOW_SUBJECTS:
            return Command(verb, rest[0].upper())
    elif verb in DATABASE_COMMANDS:
        takes = DATABASE_COMMANDS[verb]
        if not rest and not takes:
            return Command(verb)
        if len(rest) == 1 and takes is not None:
            return Command(verb, _identifier(rest[0]))
    raise AdminCommandError(
        f"invalid admin console command: {text.strip()!r}; valid commands: {VALID_COMMANDS}"
    )


def _identifier(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return word[1:-1].replace('""', '"')
    return word


# --------------------------------------------------------------------------- formatting


def _wall_clock(monotonic_ns: int, now_ns: int) -> str:
    """A monotonic timestamp as PgBouncer prints times: '2024-05-01 12:00:00 UTC'."""
    seconds_ago = (now_ns - monotonic_ns) / 1e9
    return datetime.fromtimestamp(time.time() - seconds_ago, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def _s_as_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _split_addr(name: Any) -> tuple[str | None, str | None]:
    """(address, port) of a socket name from get_extra_info, as text."""
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), str(name[1])
    return None, None


def _tls_text(transport: Any) -> str:
    """SHOW CLIENTS/SERVERS' `tls`: protocol/cipher of a TLS connection (wss:// and HTTPS
    included), as PgBouncer shows it; "" without TLS."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0]}" if cipher else str(ssl_object.version())


def _ptr(obj: object | None) -> str:
    # PgBouncer shows the object's address; ours is as unique for as long as the object lives.
    return "" if obj is None else hex(id(obj))


def _setting_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"  # PgBouncer's way, and numeric for exporters
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------- STATS


@dataclass(slots=True)
class StatsFigures:
    """What a SHOW STATS row says, in PgBouncer's units (µs, bytes, per second)."""

    xact_count: int = 0
    query_count: int = 0
    received: int = 0
    sent: int = 0
    xact_time_us: int = 0
    query_time_us: int = 0
    wait_time_us: int = 0
    # Over the last complete stats_period (or since the pool started, before one completes).
    xact_rate: float = 0.0
    query_rate: float = 0.0
    recv_rate: float = 0.0
    sent_rate: float = 0.0
    window_xacts: int = 0
    window_hold_ns: int = 0
    window_queries: int = 0
    window_query_ns: int = 0
    window_waits: int = 0
    window_wait_ns: int = 0

    def add_pool(self, pool: Pool, now: TrafficStats) -> None:
        self.xact_count += now.xact_count
        self.query_count += now.query_count
        self.received += now.bytes_received
        self.sent += now.bytes_sent
        self.xact_time_us += now.hold.sum_ns // 1000
        self.query_time_us += now.query.sum_ns // 1000
        self.wait_time_us += now.wait.sum_ns // 1000
        snapshots = pool.snapshots
        if len(snapshots) >= 2:
            start, end = snapshots[-2], snapshots[-1]
            earlier, later = start.totals, end.totals
            seconds = (end.at_ns - start.at_ns) / 1e9
        else:
            earlier, later = snapshots[0].totals, now
            seconds = (time.monotonic_ns() - snapshots[0].at_ns) / 1e9
        seconds = max(seconds, 1e-9)
        self.xact_rate += (later.xact_count - earlier.xact_count) / seconds
        self.query_rate += (later.query_count - earlier.query_count) / seconds
        self.recv_rate += (later.bytes_received - earlier.bytes_received) / seconds
        self.sent_rate += (later.bytes_sent - earlier.bytes_sent) / seconds
        self.window_xacts += later.hold.count - earlier.hold.count
        self.window_hold_ns += later.hold.sum_ns - earlier.hold.sum_ns
        self.window_queries += later.query.count - earlier.query.count
        self.window_query_ns += later.query.sum_ns - earlier.query.sum_ns
        self.window_waits += later.wait.count - earlier.wait.count
        self.window_wait_ns += later.wait.sum_ns - earlier.wait.sum_ns

    def totals(self) -> list[int]:
        return [
            self.xact_count, self.query_count, self.received, self.sent,
            self.xact_time_us, self.query_time_us, self.wait_time_us,
        ]  # fmt: skip

    def averages(self) -> list[int]:
        """Rates per second; mean transaction, query and checkout-wait time in µs."""
        return [
            round(self.xact_rate), round(self.query_rate), round(self.recv_rate),
            round(self.sent_rate),
            self.window_hold_ns // 1000 // self.window_xacts if self.window_xacts else 0,
            self.window_query_ns // 1000 // self.window_queries if self.window_queries else 0,
            self.window_wait_ns // 1000 // self.window_waits if self.window_waits else 0,
        ]  # fmt: skip


def stats_by_database(manager: PoolManager) -> dict[str, StatsFigures]:
    figures: dict[str, StatsFigures] = {}
    for pool in manager.pools.values():
        figures.setdefault(pool.database, StatsFigures()).add_pool(pool, pool.stats.totals())
    return dict(sorted(figures.items()))


# --------------------------------------------------------------------------- the console


class AdminConsole:
    """What every console session shares: the registry (settings, pools, hooks) and sessions."""

    def __init__(self, registry: ClientRegistry, activity: ActivityWatch) -> None:
        self.registry = registry
        self.activity = activity  # PostgreSQL's answers about long holders (activity.py)
        self.sessions: set[AdminConnection] = set()

    @property
    def manager(self) -> PoolManager:
        return self.registry.manager

    @property
    def settings(self) -> Settings:
        return self.registry.settings  # replaced by RELOAD, so never kept

    def login(self, client: ClientConnection, startup: codec.StartupMessage, early: bytes) -> None:
        """Take over `client`'s transport (the ClientRegistry.admin_login hook)."""
        user = startup.user
        settings = self.settings
        if user in settings.admin_users:
            is_admin = True
        elif user in settings.stats_users:
            is_admin = False
        else:
            client.fail(
                AdminNotAllowed(
                    f'not allowed: user "{user}" may not use the admin console',
                    hint="list the user in admin_users (or stats_users for SHOW only)",
                )
            )
            return
        session = AdminConnection(self, client, is_admin=is_admin)
        client.transport.set_protocol(session)
        self.sessions.add(session)
        session.welcome(early)
        if settings.log_connections:
            log.info(
                "admin console login: %s user=%s%s", client.peer, user, "" if is_admin else " (SHOW only)"
            )

    # ------------------------------------------------------------------ running commands

    async def run(self, command: Command, *, is_admin: bool) -> bytes:
        """Execute one command; the messages to send (no ReadyForQuery). Raises PoolerError."""
        if command.verb == "SHOW":
            subject = command.argument
            assert subject is not None
            if subject == "HELP":
                return build_notice_response(
                    "pypooler admin console", detail=f"commands: {VALID_COMMANDS}"
                ) + codec.build_command_complete("SHOW")
            if subject == "ADVICE":
                return (await self.show_advice()).encode()
            return self.show(subject).encode()
        if not is_admin:
            raise AdminPermissionDenied(
                f"admin access needed for {command.verb}: this user is in stats_users, which may only SHOW",
                hint="list the user in admin_users",
            )
        run = self._commands[command.verb]
        await run(self, command.argument)
        return codec.build_command_complete(command.verb)

    def show(self, subject: str) -> ResultSet:
        return self._shows[subject](self)

    def _database(self, name: str | None) -> str | None:
        """A database a command names, checked to exist (None: all)."""
        if name is not None and name not in self.manager.databases():
            raise AdminInvalidValue(f'no such database: "{name}"')
        return name

    async def _wait_until(self, done: Callable[[], bool], still_wanted: Callable[[], bool]) -> None:
        while not done() and still_wanted():
            await asyncio.sleep(DRAIN_POLL_S)

    async def pause(self, name: str | None) -> None:
        """Returns when every server of the database(s) has been released and closed."""
        database = self._database(name)
        manager = self.manager
        manager.pause(database)
        log.info("PAUSE %s", database or "(all)")
        await self._wait_until(
            lambda: all(pool.drained for pool in manager.pools_of(database)),
            # RESUME from another session ends the wait: there is nothing to wait for any more.
            lambda: manager.paused_all if database is None else manager.is_paused(database),
        )

    async def resume(self, name: str | None) -> None:
        database = self._database(name)
        manager = self.manager
        if database is not None and manager.paused_all:
            raise AdminInvalidValue(
                "all databases are paused: RESUME without a database name resumes them",
            )
        manager.resume(database)
        log.info("RESUME %s", database or "(all)")

    async def kill(self, name: str | None) -> None:
        database = self._database(name)
        assert database is not None
        log.warning("KILL %s: closing its clients and servers", database)
        self.manager.kill(
            database,
            KilledByAdmin(
                f'terminating connection: database "{database}" was killed from the admin console',
                hint="it accepts transactions again after RESUME",
            ),
        )

    async def disable(self, name: str | None) -> None:
        database = self._database(name)
        assert database is not None
        self.manager.disabled.add(database)
        log.info("DISABLE %s: new logins refused", database)

    async def enable(self, name: str | None) -> None:
        database = self._database(name)
        assert database is not None
        self.manager.disabled.discard(database)
        log.info("ENABLE %s", database)

    async def reconnect(self, name: str | None) -> None:
        database = self._database(name)
        self.manager.reconnect(database)
        log.info("RECONNECT %s", database or "(all)")

    async def wait_close(self, name: str | None) -> None:
        database = self._database(name)
        manager = self.manager
        await self._wait_until(
            lambda: not any(pool.close_pending for pool in manager.pools_of(database)),
            lambda: True,
        )

    async def reload(self, _: str | None) -> None:
        reload = self.registry.reload
        if reload is None:
            raise AdminCommandError("RELOAD is not available: this pooler has no configuration to re-read")
        try:
            reload()
        except ConfigError as exc:
            raise AdminInvalidValue(
                "RELOAD failed: the configuration has errors; the previous one stays in force",
                detail="\n".join(exc.problems),
            ) from None

    async def shutdown(self, _: str | None) -> None:
        shutdown = self.registry.shutdown
        if shutdown is None:
            raise AdminCommandError("SHUTDOWN is not available in this pooler")
        log.warning("SHUTDOWN requested from the admin console")
        # After this command's reply is queued: closing a transport still sends what it holds.
        asyncio.get_running_loop().call_soon(shutdown)

    _commands: Final[dict[str, Callable[[AdminConsole, str | None], Awaitable[None]]]] = {
        "PAUSE": pause, "RESUME": resume, "KILL": kill, "DISABLE": disable, "ENABLE": enable,
        "RECONNECT": reconnect, "WAIT_CLOSE": wait_close, "RELOAD": reload, "SHUTDOWN": shutdown,
    }  # fmt: skip

    # ------------------------------------------------------------------ SHOW (PgBouncer's)

    def show_pools(self) -> ResultSet:
        now = time.monotonic_ns()
        rows: list[Row] = []
        for pool in sorted(self.manager.pools.values(), key=lambda p: (p.database, p.user)):
            oldest = next((client for client in pool.waiters if client.waiting), None)
            waited_us = (now - oldest.wait_started_ns) // 1000 if oldest is not None else 0
            idle = len(pool.idle)
            linked = sum(1 for server in pool.servers if server.client is not None)
            linked += sum(1 for request in pool.http_clients if request.server is not None)
            rows.append([
                pool.database, pool.user,
                str(max(0, pool.client_count - pool.waiting)), str(pool.waiting), "0", "0",
                str(linked), "0", "0", str(idle), "0",
                # Neither idle nor linked: running server_reset_query (PgBouncer's "tested").
                str(len(pool.servers) - idle - linked),
                str(pool.connecting), str(waited_us // 1_000_000), str(waited_us % 1_000_000),
                pool.mode,
            ])  # fmt: skip
        return ResultSet(POOLS_COLUMNS, rows)

    def show_stats(self) -> ResultSet:
        rows: list[Row] = [
            [database, *map(str, figures.totals()), *map(str, figures.averages())]
            for database, figures in stats_by_database(self.manager).items()
        ]
        return ResultSet(STATS_COLUMNS, rows)

    def show_stats_totals(self) -> ResultSet:
        rows: list[Row] = [
            [database, *map(str, figures.totals())]
            for database, figures in stats_by_database(self.manager).items()
        ]
        return ResultSet(STATS_PART_COLUMNS, rows)

    def show_stats_averages(self) -> ResultSet:
        rows: list[Row] = [
            [database, *map(str, figures.averages())]
            for database, figures in stats_by_database(self.manager).items()
        ]
        return ResultSet(STATS_PART_COLUMNS, rows)

    def show_totals(self) -> ResultSet:
        """SHOW STATS summed over every database, one row per figure."""
        everything = StatsFigures()
        for pool in self.manager.pools.values():
            everything.add_pool(pool, pool.stats.totals())
        names = [name for name, _ in STATS_COLUMNS[1:]]
        values = everything.totals() + everything.averages()
        return ResultSet(TOTALS_COLUMNS, [[n, str(v)] for n, v in zip(names, values, strict=True)])

    def show_clients(self) -> ResultSet:
        now = time.monotonic_ns()
        rows: list[Row] = []
        for pool in sorted(self.manager.pools.values(), key=lambda p: (p.database, p.user)):
            for client in sorted(pool.clients, key=lambda cl: cl.connected_ns):
                waited_us = (now - client.wait_started_ns) // 1000 if client.waiting else 0
                rows.append(self._connection_row(
                    client, "C", client.user, pool.database,
                    "waiting" if client.waiting else "active",
                    client.transport.get_extra_info("peername"), client.connected_ns,
                    max(client.connected_ns, client.query_start_ns), now,
                    waited_us=waited_us, link=client.server, close_needed=False, remote_pid=0,
                    application_name=client.application_name,
                    transport=transport_name(client.transport),
                ))  # fmt: skip
            for request in pool.http_clients:
                waited_us = (now - request.wait_started_ns) // 1000 if request.waiting else 0
                rows.append(self._connection_row(
                    request, "C", request.user, pool.database,
                    "waiting" if request.waiting else "active",
                    request.transport.get_extra_info("peername") if request.transport else None,
                    request.connected_ns, max(request.connected_ns, request.query_start_ns), now,
                    waited_us=waited_us, link=request.server, close_needed=False, remote_pid=0,
                    application_name=request.application_name, transport=request.transport_name,
                ))  # fmt: skip
        for session in sorted(self.sessions, key=lambda s: s.client.connected_ns):
            client = session.client
            rows.append(self._connection_row(
                client, "C", client.user, client.database, "active",
                client.transport.get_extra_info("peername"), client.connected_ns,
                session.request_ns, now, waited_us=0, link=None, close_needed=False,
                remote_pid=0, application_name=client.application_name,
                transport=transport_name(client.transport),
            ))  # fmt: skip
        return ResultSet(CONNECTION_COLUMNS, rows)

    def show_servers(self) -> ResultSet:
        now = time.monotonic_ns()
        rows: list[Row] = []
        for pool in sorted(self.manager.pools.values(), key=lambda p: (p.database, p.user)):
            idle = set(pool.idle)
            requests = {r.server: r for r in pool.http_clients if r.server is not None}
            for server in sorted(pool.servers, key=lambda s: s.created_ns):
                client: Any = server.client or requests.get(server)
                if client is not None:
                    state = "active"
                elif server in idle:
                    state = "idle"
                else:
                    state = "tested"
                rows.append(self._connection_row(
                    server, "S", server.login.user, pool.database, state,
                    server.transport.get_extra_info("peername"), server.created_ns,
                    server.last_used_ns if client is None else client.query_start_ns, now,
                    waited_us=0, link=client, close_needed=server.close_needed,
                    remote_pid=server.process_id,
                    application_name=client.application_name if client is not None else "",
                    transport=transport_name(server.transport),
                ))  # fmt: skip
        return ResultSet(CONNECTION_COLUMNS, rows)

    @staticmethod
    def _connection_row(
        connection: Any, kind: str, user: str, database: str, state: str, peer: Any,
        connected_ns: int, request_ns: int, now: int, *, waited_us: int, link: object | None,
        close_needed: bool, remote_pid: int, application_name: str, transport: str,
    ) -> Row:  # fmt: skip
        addr, port = _split_addr(peer)
        raw = connection.transport
        local_addr, local_port = _split_addr(raw.get_extra_info("sockname") if raw is not None else None)
        return [
            kind, user, database, state, addr, port, local_addr, local_port,
            _wall_clock(connected_ns, now), _wall_clock(request_ns, now),
            str(waited_us // 1_000_000), str(waited_us % 1_000_000), str(int(close_needed)),
            _ptr(connection), _ptr(link), str(remote_pid), _tls_text(raw), application_name, transport,
        ]  # fmt: skip

    def show_databases(self) -> ResultSet:
        manager = self.manager
        settings = self.settings
        rows: list[Row] = []
        for name in manager.databases():
            pools = manager.pools_of(name)
            found = manager.database_config(name)
            if found is not None:
                db = found[1]
                host, port, dbname = db.host, db.targets()[0][1], db.dbname or name
                force_user, pool_mode = db.user, db.pool_mode
                pool_size = db.pool_size or settings.default_pool_size
                min_size, reserve, limit = settings.pool_limits(db)
            else:  # left the configuration at a RELOAD; its pools still serve their clients
                login = pools[0].login
                host, port, dbname, force_user, pool_mode = login.host, login.port, login.database, None, None
                pool_size, min_size, reserve = pools[0].size, pools[0].min_size, pools[0].reserve_size
                limit = pools[0].bounds[0].limit if pools[0].bounds else 0
            rows.append([
                name, host, str(port), dbname, force_user, str(pool_size), str(min_size), str(reserve),
                pool_mode, str(limit), str(sum(p.occupied for p in pools)),
                str(int(manager.is_paused(name))), str(int(name in manager.disabled)),
            ])  # fmt: skip
        return ResultSet(DATABASES_COLUMNS, rows)

    def _users(self) -> list[str]:
        users = {pool.user for pool in self.manager.pools.values()}
        users.update(client.user for pool in self.manager.pools.values() for client in pool.clients)
        users.update(session.client.user for session in self.sessions)
        return sorted(users)

    def show_users(self) -> ResultSet:
        settings = self.settings
        rows: list[Row] = []
        for user in self._users():
            bound = self.manager.user_bounds.get(user)
            by_user = settings.users.get(user)
            mode = by_user.pool_mode if by_user is not None else None
            limit = settings.max_user_connections_of(user)
            rows.append([user, mode, str(limit), str(bound.used if bound is not None else 0)])
        return ResultSet(USERS_COLUMNS, rows)

    def show_config(self) -> ResultSet:
        settings = self.settings
        rows: list[Row] = []
        for key, field in type(settings).model_fields.items():
            if key in ("databases", "users"):  # SHOW DATABASES and SHOW USERS show them
                continue
            default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
            rows.append([
                key, _setting_text(getattr(settings, key)), _setting_text(default),
                "no" if key in RESTART_ONLY_SETTINGS else "yes",
            ])  # fmt: skip
        return ResultSet(CONFIG_COLUMNS, rows)

    def show_version(self) -> ResultSet:
        return ResultSet(VERSION_COLUMNS, [[f"pypooler {__version__}"]])

    def show_lists(self) -> ResultSet:
        manager = self.manager
        registry = self.registry
        welcomed = sum(len(pool.clients) for pool in manager.pools.values())
        items = {
            "databases": len(manager.databases()),
            "users": len(self._users()),
            "pools": len(manager.pools),
            "free_clients": 0,  # PgBouncer's cache of freed objects; Python has none to show
            "used_clients": len(registry.clients),
            "login_clients": max(0, len(registry.clients) - welcomed - len(self.sessions)),
            "free_servers": 0,
            "used_servers": sum(len(pool.servers) for pool in manager.pools.values()),
            "dns_names": 0,  # host names are resolved by the OS at each connect, not cached
            "dns_zones": 0,
            "dns_queries": 0,
            "dns_pending": 0,
            # pypooler's own: accept() calls that failed for want of file descriptors.
            "accept_failures": registry.accept_failures,
        }
        return ResultSet(LISTS_COLUMNS, [[name, str(n)] for name, n in items.items()])

    # ------------------------------------------------------------------ SHOW (pypooler's)

    def show_top_statements(self) -> ResultSet:
        """Statement fingerprints by total hold time (since start): what keeps servers busy."""
        found = []
        for pool in self.manager.pools.values():
            for text, stats in pool.stats.statements.items():
                found.append((stats.hold.sum_ns, pool, text, stats))
        found.sort(key=lambda entry: entry[0], reverse=True)
        rows: list[Row] = [
            [
                pool.database,
                pool.user,
                str(stats.count),
                _ms(total_ns),
                _ms(total_ns / stats.count) if stats.count else "0.000",
                _s_as_ms(stats.hold.quantile_s(0.5)),
                _s_as_ms(stats.hold.quantile_s(0.99)),
                _ms(stats.idle_ns),
                text,
            ]
            for total_ns, pool, text, stats in found
        ]
        return ResultSet(TOP_STATEMENTS_COLUMNS, rows)

    def show_holders(self) -> ResultSet:
        """Servers held right now, longest hold first, what their clients are doing and, for
        holds past holder_diagnosis_ms, what PostgreSQL last said their backends do."""
        now = time.monotonic_ns()
        pools = list(self.manager.pools.values())
        held = [(client, pool) for pool in pools for client in pool.holders(now)]
        held.sort(key=lambda entry: entry[0].lent_ns)
        found_all = diagnose_all(pools, self.activity.reports, now)
        diagnoses = {(d.holder.server_address, d.holder.server_pid): d for d in found_all}
        rows: list[Row] = []
        for client, pool in held:
            server = client.server
            if not client.idle_since_ns:
                state, idle_ns = "active", 0
            else:
                idle_ns = now - client.idle_since_ns
                if not client.idle_in_xact:
                    state = "idle"  # session mode: held between transactions
                elif server is not None and server.backend.tx_status == c.TX_FAILED:
                    state = "idle in transaction (aborted)"
                else:
                    state = "idle in transaction"
            statement = statement_text(client.frontend.last_statement)
            found = diagnoses.get((server.address, server.process_id)) if server is not None else None
            blocker = found.blocker if found is not None else None
            rows.append([
                pool.database, pool.user, client.peer, client.application_name, state,
                _ms(now - client.lent_ns), _ms(idle_ns),
                str(server.process_id) if server is not None else None,
                statement, found.state if found is not None else None,
                (found.wait or None) if found is not None else None,
                blocker.describe() if blocker is not None else None,
            ])  # fmt: skip
        return ResultSet(HOLDERS_COLUMNS, rows)

    def show_listeners(self) -> ResultSet:
        """Each pool's listener connection (listen_mode = "multiplex", listening.py)."""
        rows: list[Row] = []
        for pool in sorted(self.manager.pools.values(), key=lambda p: (p.database, p.user)):
            listener = pool.listener
            if listener is None:
                continue
            server = listener.server
            rows.append([
                pool.database, pool.user, listener.state(),
                str(server.process_id) if server is not None else None,
                str(len(listener.map)), str(len(listener.map.by_subscriber)), str(listener.delivered),
                str(listener.dropped), str(listener.reconnects),
            ])  # fmt: skip
        return ResultSet(LISTENERS_COLUMNS, rows)

    async def show_advice(self) -> ResultSet:
        names, rows = await advice_table(self.manager, self.settings, self.activity)
        return ResultSet([(name, TEXT) for name in names], rows)

    _shows: Final[dict[str, Callable[[AdminConsole], ResultSet]]] = {
        "POOLS": show_pools, "STATS": show_stats, "STATS_TOTALS": show_stats_totals,
        "STATS_AVERAGES": show_stats_averages, "TOTALS": show_totals, "CLIENTS": show_clients,
        "SERVERS": show_servers, "DATABASES": show_databases, "USERS": show_users,
        "CONFIG": show_config, "VERSION": show_version, "LISTS": show_lists,
        "TOP_STATEMENTS": show_top_statements, "HOLDERS": show_holders, "LISTENERS": show_listeners,
    }  # fmt: skip


# --------------------------------------------------------------------------- one session


class AdminConnection(asyncio.Protocol):
    """One console session, on the transport a ClientConnection handed over after the startup
    packet. Messages are answered in order by one task, so PAUSE can wait without blocking the
    loop and a query sent behind it is answered after it."""

    __slots__ = (
        "_extended_failed",
        "_inbox",
        "_reader",
        "_worker",
        "client",
        "closed",
        "console",
        "is_admin",
        "request_ns",
        "transport",
    )

    def __init__(self, console: AdminConsole, client: ClientConnection, *, is_admin: bool) -> None:
        self.console = console
        self.client = client  # still in registry.clients: counted against max_client_conn
        self.transport = client.transport
        self.is_admin = is_admin
        self.closed = False
        self.request_ns = time.monotonic_ns()
        self._reader = codec.MessageReader()
        self._inbox: list[tuple[int, bytes]] = []
        self._worker: asyncio.Task[None] | None = None
        self._extended_failed = False  # an extended-protocol batch got its error; skip to Sync

    def welcome(self, early: bytes) -> None:
        parameters = {**CONSOLE_PARAMETERS, "application_name": self.client.application_name}
        self.transport.write(
            codec.AUTHENTICATION_OK
            + codec.build_parameter_statuses(parameters)
            # Nothing here can be cancelled, but clients expect a key.
            + codec.build_backend_key_data(secrets.randbits(31), secrets.randbits(31))
            + codec.READY_FOR_QUERY_IDLE
        )
        if early:
            self.data_received(early)

    # ------------------------------------------------------------------ asyncio callbacks
    # (no connection_made: the transport was connected before the hand-over)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._inbox.extend(self._reader.feed(data))
        except ProtocolViolation as exc:
            self._fatal(exc)
            return
        if self._inbox and self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._answer())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.console.sessions.discard(self)
        self.console.registry.clients.discard(self.client)
        self.client.console_closed()
        if self._worker is not None:
            self._worker.cancel()  # a PAUSE or WAIT_CLOSE nobody waits for any more

    # ------------------------------------------------------------------ messages

    async def _answer(self) -> None:
        try:
            while self._inbox and not self.closed:
                msg_type, body = self._inbox.pop(0)
                reply = await self._reply(msg_type, body)
                if reply and not self.closed:
                    self.transport.write(reply)
        finally:
            self._worker = None

    async def _reply(self, msg_type: int, body: bytes) -> bytes:
        if msg_type == c.F_QUERY:
            self.request_ns = time.monotonic_ns()
            return await self._simple_query(body) + codec.READY_FOR_QUERY_IDLE
        if msg_type == c.F_TERMINATE:
            self.closed = True
            self.transport.close()
            return b""
        if msg_type == c.F_SYNC:
            self._extended_failed = False
            return codec.READY_FOR_QUERY_IDLE
        if msg_type in _EXTENDED_PROTOCOL:
            if self._extended_failed:
                return b""
            self._extended_failed = True
            return self._unsupported("the extended query protocol")
        if msg_type == c.F_FUNCTION_CALL:
            return self._unsupported("FunctionCall") + codec.READY_FOR_QUERY_IDLE
        if msg_type in _COPY_MESSAGES:
            return b""  # no COPY runs here; PostgreSQL ignores strays outside copy mode too
        self._fatal(ProtocolViolation(f"unexpected message type {chr(msg_type)!r} on the admin console"))
        return b""

    def _unsupported(self, what: str) -> bytes:
        return AdminUnsupported(
            f"the admin console supports only the simple query protocol, not {what}",
            hint="send commands as plain queries (psql, or a driver's simple-query mode)",
        ).to_error_response()

    async def _simple_query(self, body: bytes) -> bytes:
        try:
            text, _ = codec.read_cstring(body, 0, "query")
        except ProtocolViolation as exc:
            return AdminCommandError(exc.message).to_error_response()
        try:
            commands = parse_commands(text)
        except AdminCommandError as exc:
            return exc.to_error_response()
        if not commands:
            return codec.build_message(c.B_EMPTY_QUERY_RESPONSE)
        replies: list[bytes] = []
        for command in commands:
            try:
                replies.append(await self.console.run(command, is_admin=self.is_admin))
            except PoolerError as exc:
                # Like PostgreSQL's simple query: an error ends the rest of the string.
                replies.append(exc.to_error_response())
                break
        return b"".join(replies)

    def _fatal(self, exc: PoolerError) -> None:
        self.client.registry.log_limiter.log(
            log, logging.WARNING, ("admin", exc.reason),
            "admin console %s: %s", self.client.peer, exc.message,
        )  # fmt: skip
        if not self.closed:
            self.closed = True
            self.transport.write(exc.to_error_response("FATAL"))
            self.transport.close()
