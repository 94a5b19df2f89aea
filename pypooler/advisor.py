"""The Little's-law advisor: pool stats in, sizing verdicts out.

The arithmetic an operator would do by hand when a service stalls while the database idles:
- connections needed = arrival rate x mean hold time (Little's law), against pool_size;
- how much of the hold is the server idle in a transaction, waiting on the client (the "800 ms
  payment call inside the transaction" bug), and which application_name does it;
- instances x pool bounds against the server's max_connections minus its reserved slots.

`advise_pool` is pure (unit-tested with made-up numbers); `advice_table` and `check_capacity`
gather the inputs from live pools and from the server itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from pypooler.config import Settings
from pypooler.pool import Pool, PoolManager
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import PoolerError
from pypooler.server import ServerConnection, ServerLogin, open_server_connection
from pypooler.stats import Histogram, TrafficStats

log = logging.getLogger("pypooler.advisor")

# Verdict thresholds, stated once so the report and its tests agree.
BUSY_FRACTION = 0.8  # connections needed / pool_size above this: the pool is (nearly) exhausted
IDLE_SHARE_CULPRIT = 0.3  # idle-in-transaction share of hold time that names it the cause
WAIT_P99_NOTICEABLE_S = 0.010  # a p99 checkout wait above this means clients queue
HEADROOM_FACTOR = 1.25  # suggested pool_size = needed x this
LIMITS_TTL_S = 60.0  # how long a server's max_connections answer is reused


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int
    reserved_connections: int  # superuser_reserved_connections (+ reserved_connections on 16+)

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved_connections


@dataclass
class PoolAdvice:
    database: str
    user: str
    window_s: float
    xact_per_s: float
    hold_mean_ms: float
    hold_p50_ms: float
    hold_p99_ms: float
    idle_share: float  # of hold time, 0..1
    wait_p99_ms: float
    waited_share: float  # of checkouts that queued, 0..1
    connections_needed: float
    pool_size: int
    timeouts: int
    top_idle_application: str | None
    server_limits: ServerLimits | None
    bound_x_instances: int
    verdicts: list[str] = field(default_factory=list)


def _waited_share(wait: Histogram) -> float:
    """Checkouts that queued at all: everything above the first bucket (100 µs)."""
    return (wait.count - wait.counts[0]) / wait.count if wait.count else 0.0


def advise_pool(
    database: str,
    user: str,
    *,
    window: TrafficStats,
    window_s: float,
    apps: dict[str, TrafficStats],
    pool_size: int,
    server_limits: ServerLimits | None,
    bound_x_instances: int,
    expected_instances: int,
) -> PoolAdvice:
    """Verdicts for one pool from what happened in the last window."""
    hold = window.hold
    rate = hold.count / window_s if window_s > 0 else 0.0
    hold_mean = hold.mean_s()
    needed = rate * hold_mean  # Little's law: L = lambda x W
    idle_share = window.idle_in_xact.sum_ns / hold.sum_ns if hold.sum_ns else 0.0
    wait_p99 = window.wait.quantile_s(0.99)
    timeouts = window.errors["query_wait_timeout"]
    top_idle = max(apps.items(), key=lambda kv: kv[1].idle_in_xact.sum_ns, default=None)
    top_idle_app = top_idle[0] if top_idle and top_idle[1].idle_in_xact.sum_ns else None
    advice = PoolAdvice(
        database, user, window_s, rate, hold_mean * 1e3, hold.quantile_s(0.5) * 1e3,
        hold.quantile_s(0.99) * 1e3, idle_share, wait_p99 * 1e3, _waited_share(window.wait),
        needed, pool_size, timeouts, top_idle_app, server_limits, bound_x_instances,
    )  # fmt: skip
    verdicts = advice.verdicts
    queued = wait_p99 > WAIT_P99_NOTICEABLE_S or timeouts > 0
    exhausted = needed >= BUSY_FRACTION * pool_size or queued
    if not hold.count:
        verdicts.append("no transactions in the window")
    elif exhausted and idle_share >= IDLE_SHARE_CULPRIT:
        idle_ms = advice.hold_p99_ms * idle_share
        who = f", mostly application_name={top_idle_app}" if top_idle_app is not None else ""
        verdicts.append(
            f"pool exhausted: p99 hold {advice.hold_p99_ms:.0f} ms, ~{idle_ms:.0f} ms of it idle"
            f" in transaction{who}: clients hold servers across non-database work"
            " (borrow late, return early; commit before calling out)"
        )
    elif exhausted:
        verdicts.append(
            f"pool exhausted: {needed:.1f} connections needed ({rate:.0f} xact/s x"
            f" {hold_mean * 1e3:.1f} ms mean hold) vs pool_size {pool_size}; raise pool_size to"
            f" ~{max(pool_size + 1, round(needed * HEADROOM_FACTOR))} if the server has room,"
            " or shorten transactions"
        )
    else:
        verdicts.append(
            f"ok: {needed:.1f} of {pool_size} connections needed"
            f" ({rate:.0f} xact/s x {hold_mean * 1e3:.1f} ms mean hold)"
        )
    if queued:
        verdicts.append(
            f"clients wait: p99 checkout wait {advice.wait_p99_ms:.0f} ms,"
            f" {advice.waited_share:.0%} of checkouts queued, {timeouts} query_wait_timeouts"
        )
    if server_limits is not None:
        if bound_x_instances > server_limits.available:
            verdicts.append(
                f"over capacity: {expected_instances} instance(s) x pool bounds ="
                f" {bound_x_instances} server connections > max_connections"
                f" {server_limits.max_connections} - {server_limits.reserved_connections} reserved"
                f" = {server_limits.available}: expect 'sorry, too many clients already'"
            )
        else:
            verdicts.append(
                f"capacity ok: {bound_x_instances} of {server_limits.available} server connections at most"
            )
    return advice


# --------------------------------------------------------------------------- live inputs

_limits_cache: dict[tuple[str, int], tuple[float, ServerLimits]] = {}


async def server_limits(login: ServerLogin, timeout: float) -> ServerLimits | None:
    """max_connections and the reserved slots, asked of the server (cached per host:port)."""
    key = (login.host, login.port)
    cached = _limits_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < LIMITS_TTL_S:
        return cached[1]
    try:
        server = await open_server_connection(login, timeout)
    except PoolerError as exc:
        log.info("cannot ask %s for max_connections: %s", login.describe(), exc.message)
        return None
    try:
        values = await _query_row(
            server,
            "select current_setting('max_connections'),"
            " current_setting('superuser_reserved_connections'),"
            " coalesce(current_setting('reserved_connections', true), '0')",
            timeout,
        )
    finally:
        server.close()
    if values is None:
        return None
    limits = ServerLimits(int(values[0]), int(values[1]) + int(values[2] or 0))
    _limits_cache[key] = (time.monotonic(), limits)
    return limits


async def _query_row(server: ServerConnection, sql: str, timeout: float) -> list[str] | None:
    """The first row of `sql`, on a connection the advisor opened for itself; `timeout`
    (server_connect_timeout, as for the connect): asking is part of connecting to learn the
    limits, and a server that does not answer such a query in that time is not answering."""
    done: asyncio.Future[list[str] | None] = asyncio.get_running_loop().create_future()
    row: list[str] | None = None

    def on_message(msg_type: int, body: bytes) -> bool:
        nonlocal row
        if msg_type == c.B_DATA_ROW and row is None:
            row = _decode_data_row(body)
        elif msg_type in (c.B_READY_FOR_QUERY, 0):
            if not done.done():
                done.set_result(row)
            return True
        elif msg_type == c.B_ERROR_RESPONSE:
            row = None
        return False

    server.run_internal(sql, on_message)
    return await asyncio.wait_for(done, timeout)


def _decode_data_row(body: bytes) -> list[str]:
    (count,) = codec.INT16.unpack_from(body)
    pos, values = 2, []
    for _ in range(count):
        (length,) = codec.INT32.unpack_from(body, pos)
        pos += 4
        values.append(body[pos : pos + max(length, 0)].decode())
        pos += max(length, 0)
    return values


def _bounds_by_server(manager: PoolManager, settings: Settings) -> dict[tuple[str, int], int]:
    """Sum of pool bounds per server: live pools, plus configured forced-user pools not yet open."""
    bounds: dict[tuple[str, int], int] = {}
    seen: set[tuple[str, str]] = set()
    for pool in manager.pools.values():
        key = (pool.login.host, pool.login.port)
        bounds[key] = bounds.get(key, 0) + pool.size
        seen.add((pool.database, pool.user))
    for name, db in settings.databases.items():
        if name != "*" and db.user and (name, db.user) not in seen:
            key = db.targets()[0]
            bounds[key] = bounds.get(key, 0) + settings.pool_size_of(db, db.user)
    return bounds


def window_of(pool: Pool) -> tuple[TrafficStats, dict[str, TrafficStats], float]:
    """Totals since the oldest kept snapshot (or since the pool started), and its length."""
    now = time.monotonic_ns()
    current = pool.stats.totals()
    if not pool.snapshots:
        return current, dict(pool.stats.apps), (now - pool.stats.started_ns) / 1e9
    base = pool.snapshots[0]
    window = TrafficStats()
    window.merge(current)
    subtract(window, base.totals)
    apps = {}
    for name, stats in pool.stats.apps.items():
        app_window = TrafficStats()
        app_window.merge(stats)
        earlier = base.apps.get(name)
        if earlier is not None:
            subtract(app_window, earlier)
        apps[name] = app_window
    return window, apps, (now - base.at_ns) / 1e9


def subtract(stats: TrafficStats, earlier: TrafficStats) -> None:
    """stats -= earlier, for the counters and histograms the advisor reads."""
    for name in TrafficStats.HISTOGRAMS:
        setattr(stats, name, getattr(stats, name).minus(getattr(earlier, name)))
    stats.errors.subtract(earlier.errors)


async def advise(manager: PoolManager, settings: Settings) -> list[PoolAdvice]:
    bounds = _bounds_by_server(manager, settings)
    advice = []
    for pool in list(manager.pools.values()):
        limits = await server_limits(pool.login, settings.server_connect_timeout)
        window, apps, window_s = window_of(pool)
        server_key = (pool.login.host, pool.login.port)
        advice.append(
            advise_pool(
                pool.database, pool.user, window=window, window_s=window_s, apps=apps,
                pool_size=pool.size, server_limits=limits,
                bound_x_instances=bounds.get(server_key, pool.size) * settings.expected_instances,
                expected_instances=settings.expected_instances,
            )
        )  # fmt: skip
    return advice


ADVICE_COLUMNS = [
    "database", "user", "window_s", "xact_per_s", "hold_mean_ms", "hold_p50_ms", "hold_p99_ms",
    "idle_in_xact_pct", "wait_p99_ms", "waited_pct", "connections_needed", "pool_size",
    "query_wait_timeouts", "top_idle_application", "server_max_connections",
    "server_connections_available", "bound_x_instances", "verdict",
]  # fmt: skip


async def advice_table(manager: PoolManager, settings: Settings) -> tuple[list[str], list[list[str | None]]]:
    """SHOW ADVICE: one row per pool, figures as text, verdicts joined by ' | '."""
    rows: list[list[str | None]] = []
    for a in await advise(manager, settings):
        limits = a.server_limits
        rows.append([
            a.database, a.user, f"{a.window_s:.1f}", f"{a.xact_per_s:.1f}", f"{a.hold_mean_ms:.2f}",
            f"{a.hold_p50_ms:.2f}", f"{a.hold_p99_ms:.2f}", f"{a.idle_share * 100:.1f}",
            f"{a.wait_p99_ms:.2f}", f"{a.waited_share * 100:.1f}", f"{a.connections_needed:.2f}",
            str(a.pool_size), str(a.timeouts), a.top_idle_application,
            str(limits.max_connections) if limits else None,
            str(limits.available) if limits else None, str(a.bound_x_instances),
            " | ".join(a.verdicts),
        ])  # fmt: skip
    return ADVICE_COLUMNS, rows


async def check_capacity(manager: PoolManager, settings: Settings) -> list[str]:
    """Warn (log and return the lines) where pool bounds x expected_instances exceed a server."""
    warnings = []
    logins: dict[tuple[str, int], ServerLogin] = {}
    for pool in manager.pools.values():
        logins.setdefault((pool.login.host, pool.login.port), pool.login)
    for name, db in settings.databases.items():
        if name != "*" and db.user:
            host, port = db.targets()[0]
            login = ServerLogin(host, port, settings.server_dbname_for(name), db.user, db.password)
            logins.setdefault((host, port), login)
    for key, total in _bounds_by_server(manager, settings).items():
        server_login = logins.get(key)
        limits = await server_limits(server_login, settings.server_connect_timeout) if server_login else None
        if limits is None:
            continue
        demand = total * settings.expected_instances
        if demand > limits.available:
            line = (
                f"server {key[0]}:{key[1]}: {settings.expected_instances} instance(s) x pool bounds"
                f" {total} = {demand} connections > max_connections {limits.max_connections} -"
                f" {limits.reserved_connections} reserved = {limits.available}"
            )
            log.warning("capacity: %s", line)
            warnings.append(line)
    return warnings
