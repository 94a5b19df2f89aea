"""The advisor: what holds the pool, from the holds in progress and the last window.

The seed's advice: find what holds connections too long before anyone raises a pool size. So
the verdicts are looked for in the seed's diagnosis order, and the first one found is the pool's
`verdict`, with its `culprit` (who or what to fix):

1. `idle_in_transaction`: holders idle inside a transaction now (a leak, or non-database work
   inside the transaction), or, while clients queue, a large idle share of the window's hold
   time; `idle_session`: session-mode holders idle between transactions while clients queue;
2. `lock_wait`: holders whose backends wait on a lock; the culprit is the root of the chain
   (the client holding it when it is ours), never its victims;
3. `slow_statement`: while clients queue, a statement holding servers far longer than the
   pool's usual hold, hold time that grew, or holds that are simply long;
4. `pool_too_small`: short holds, servers busy (rate x hold near pool_size) and clients
   queueing, and the server has room for more; `server_full` when it has none;
5. `fleet_over_max_connections`: expected_instances x pool bounds above the server's
   max_connections minus its reserved slots;
`ok`: none of these.

A bigger pool is advised by `pool_too_small` only: never when holders are idle or blocked, when
hold time is what grew, or when the server has no room; the other verdicts say what to fix.

Inputs per pool: the window (`window_of`: since the oldest kept snapshot, one or two
stats_periods) for finished holds, waits, idle time and logins; the holds in progress (SHOW
HOLDERS' data), classified with PostgreSQL's answers (holders.py, activity.py), whose time
inside the window counts too, so a 30 s lock stall is seen while it lasts; statement
fingerprints (since start); the server's max_connections. Every rate and every verdict made
from it come from that one window, and a verdict's text prints a figure as its column does.

`advise_pool` is pure (unit-tested with made-up inputs); `advise`, `advice_table` and
`check_capacity` gather the inputs from the live pools.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Final

from pypooler.activity import ActivityWatch, ServerLimits
from pypooler.config import Settings
from pypooler.holders import (
    IDLE,
    IDLE_IN_TRANSACTION,
    LOCK_WAIT,
    RUNNING,
    HolderDiagnosis,
    describe_view,
    diagnose_all,
    long_holders,
)
from pypooler.pool import Pool, PoolManager
from pypooler.server import ServerLogin
from pypooler.stats import NS_PER_S, Histogram, TrafficStats, fingerprint

log = logging.getLogger("pypooler.advisor")

# The verdicts, in the order they are looked for (see the module docstring).
IDLE_IN_TRANSACTION_VERDICT: Final = "idle_in_transaction"
IDLE_SESSION: Final = "idle_session"
LOCK_WAIT_VERDICT: Final = "lock_wait"
SLOW_STATEMENT: Final = "slow_statement"
POOL_TOO_SMALL: Final = "pool_too_small"
SERVER_FULL: Final = "server_full"
FLEET_OVER_MAX_CONNECTIONS: Final = "fleet_over_max_connections"
OK: Final = "ok"
VERDICTS: Final = (
    IDLE_IN_TRANSACTION_VERDICT, IDLE_SESSION, LOCK_WAIT_VERDICT, SLOW_STATEMENT, POOL_TOO_SMALL,
    SERVER_FULL, FLEET_OVER_MAX_CONNECTIONS, OK,
)  # fmt: skip

# Thresholds, stated once so the verdicts and their tests agree.
BUSY_FRACTION: Final = 0.8  # servers busy / pool_size above this: the pool is (nearly) all in use
IDLE_SHARE_CULPRIT: Final = 0.3  # idle-in-transaction share of hold time that names it the cause
WAIT_P99_NOTICEABLE_S: Final = 0.010  # a p99 checkout wait above this means clients queue
QUEUED_SHARE: Final = 0.5  # ... as does half the checkouts waiting at all (over 100 µs)
SHORT_HOLD_S: Final = 0.050  # a mean hold above this is long for a pool: fix the holds first
SLOW_FACTOR: Final = 10.0  # a statement this many times the pool's usual (p50) hold is slow
SLOW_STATEMENT_MIN_S: Final = 0.010  # ... and at least this long on average
SLOW_SHARE: Final = 0.2  # ... and holds at least this share of the statements' hold time
HOLD_GROWTH: Final = 2.0  # the window's mean hold this many times the earlier one: hold time grew
MIN_HOLDS_TO_COMPARE: Final = 100  # finished holds before the window needed to say it grew
HEADROOM_FACTOR: Final = 1.25  # suggested pool_size = connections wanted x this
LOGIN_NOTE_MIN: Final = 20  # logins in the window before short-lived clients are noted
SHORT_LIVED_XACTS: Final = 2.0  # transactions per login at most, for clients to be short-lived
LONG_HOLD_FALLBACK_MS: Final = 1000.0  # a long hold when holder_diagnosis_ms and hold_warn_ms are 0


@dataclass(frozen=True, slots=True)
class Verdict:
    category: str  # one of VERDICTS
    culprit: str | None  # who or what to fix: a client, a statement fingerprint, a server
    text: str


@dataclass(frozen=True, slots=True)
class StatementFigures:
    """One statement fingerprint's holds (since start, as SHOW TOP_STATEMENTS)."""

    fingerprint: str
    count: int
    total_hold_s: float

    @property
    def mean_hold_s(self) -> float:
        return self.total_hold_s / self.count if self.count else 0.0


@dataclass
class PoolAdvice:
    database: str
    user: str
    window_s: float
    xact_per_s: float  # finished transactions
    holding_now: int
    hold_mean_ms: float  # finished holds
    hold_p50_ms: float
    hold_p99_ms: float
    longest_hold_now_ms: float
    idle_share: float  # of hold time (holds in progress included), 0..1
    wait_p99_ms: float
    waited_share: float  # of checkouts that queued, 0..1
    waiting_now: int
    connections_busy: float  # servers held, on average over the window (Little's L)
    connections_wanted: float  # servers held or waited for, on average: the demand
    pool_size: int
    timeouts: int
    top_idle_application: str | None
    logins_per_s: float
    server_limits: ServerLimits | None
    bound_x_instances: int
    verdicts: list[Verdict] = field(default_factory=list)  # in the seed's order; never empty
    notes: list[str] = field(default_factory=list)  # symptoms and context, no verdict

    @property
    def verdict(self) -> Verdict:
        return self.verdicts[0]


def _waited_share(wait: Histogram) -> float:
    """Checkouts that queued at all: everything above the first bucket (100 µs)."""
    return (wait.count - wait.counts[0]) / wait.count if wait.count else 0.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def advise_pool(
    database: str,
    user: str,
    *,
    window: TrafficStats,
    window_s: float,
    apps: dict[str, TrafficStats],
    holders: list[HolderDiagnosis],
    long_s: float,
    waiting_now: int = 0,
    waited_now_s: float = 0.0,
    oldest_wait_s: float = 0.0,
    statements: list[StatementFigures] | None = None,
    hold_before: Histogram | None = None,
    pool_size: int,
    server_limits: ServerLimits | None,
    bound_x_instances: int,
    expected_instances: int,
    server: str = "",
) -> PoolAdvice:
    """Verdicts for one pool: `window` (finished holds of the last `window_s` seconds, `apps`
    the same per application), `holders` (this pool's holds in progress, classified), `long_s`
    (what counts as a long hold: holder_diagnosis_ms), the clients waiting now and their wait so
    far inside the window, `statements` (fingerprints since start), `hold_before` (holds before
    the window), the server's limits and the bounds of every pool on it x expected_instances."""
    hold = window.hold
    wait = window.wait
    span = window_s if window_s > 0 else 1.0
    # Holds in progress count for the part of them inside the window.
    live_hold_s = sum(min(d.holder.held_s, span) for d in holders)
    live_idle = {d.holder.application_name: 0.0 for d in holders}
    for d in holders:
        live_idle[d.holder.application_name] += min(d.holder.idle_total_s, span)
    busy = (hold.sum_ns / NS_PER_S + live_hold_s) / span
    wanted = busy + (wait.sum_ns / NS_PER_S + waited_now_s) / span
    held_s = hold.sum_ns / NS_PER_S + live_hold_s
    idle_s = window.idle_in_xact.sum_ns / NS_PER_S + sum(live_idle.values())
    idle_by_app = {name: stats.idle_in_xact.sum_ns / NS_PER_S for name, stats in apps.items()}
    for name, seconds in live_idle.items():
        idle_by_app[name] = idle_by_app.get(name, 0.0) + seconds
    top_idle = max(idle_by_app.items(), key=lambda kv: kv[1], default=None)
    logins = window.login.count
    advice = PoolAdvice(
        database, user, window_s, hold.count / span, len(holders), hold.mean_s() * 1e3,
        hold.quantile_s(0.5) * 1e3, hold.quantile_s(0.99) * 1e3,
        max((d.holder.held_s for d in holders), default=0.0) * 1e3,
        idle_s / held_s if held_s else 0.0, wait.quantile_s(0.99) * 1e3, _waited_share(wait),
        waiting_now, busy, wanted, pool_size, window.errors["query_wait_timeout"],
        top_idle[0] if top_idle and top_idle[1] > 0 else None, logins / span, server_limits,
        bound_x_instances,
    )  # fmt: skip
    queued = (
        advice.wait_p99_ms / 1e3 > WAIT_P99_NOTICEABLE_S
        or advice.waited_share >= QUEUED_SHARE
        or advice.timeouts > 0
        or oldest_wait_s > WAIT_P99_NOTICEABLE_S
    )
    if queued:
        advice.notes.append(
            f"clients wait: p99 checkout wait {advice.wait_p99_ms:.1f} ms,"
            f" {advice.waited_share:.0%} of checkouts queued, {advice.timeouts} query_wait_timeouts,"
            f" {waiting_now} waiting now"
        )
    found = advice.verdicts
    found += _idle_verdicts(advice, holders, long_s, queued)
    found += _lock_verdicts(holders)
    if not found:
        found += _slow_verdicts(advice, holders, long_s, queued, statements or [], hold_before)
    capacity = _capacity_verdicts(advice, expected_instances, server)
    if not found and queued and busy >= BUSY_FRACTION * pool_size:
        found.append(_too_small(advice, expected_instances))
    found += capacity
    if logins >= LOGIN_NOTE_MIN and (hold.count + len(holders)) / logins <= SHORT_LIVED_XACTS:
        advice.notes.append(
            f"short-lived clients: {logins} logins ({advice.logins_per_s:.1f}/s),"
            f" {(hold.count + len(holders)) / logins:.1f} transactions each: the pool reuses its"
            f" servers for them, no backend per login (serverless: 1-2 connections per function)"
        )
    if not found:
        found.append(
            Verdict(
                OK, None,
                f"ok: {busy:.2f} of {pool_size} connections busy on average, holds in progress"
                f" included ({advice.xact_per_s:.1f} xact/s finished, {advice.hold_mean_ms:.2f} ms"
                " mean finished hold)",
            )
        )  # fmt: skip
    return advice


def _idle_verdicts(
    advice: PoolAdvice, holders: list[HolderDiagnosis], long_s: float, queued: bool
) -> list[Verdict]:
    """Step 1: holders idle in a transaction now (any time: they hold locks and snapshots), or a
    large idle share of the window while clients queue; session-mode idle holds while they queue."""
    idle = [d for d in holders if d.state == IDLE_IN_TRANSACTION and d.holder.idle_s >= long_s]
    if idle:
        victims = _victims_by_root(holders)
        idle.sort(key=lambda d: (victims.get(d.holder.server_pid, 0), d.holder.idle_s), reverse=True)
        culprit = idle[0].holder
        blocking = victims.get(culprit.server_pid, 0)
        blocks = f"; {blocking} client(s) wait on its locks" if blocking else ""
        return [
            Verdict(
                IDLE_IN_TRANSACTION_VERDICT, describe_view(culprit),
                f"{len(idle)} client(s) hold a server idle in a transaction:"
                f" {describe_view(culprit)}{blocks}: commit or roll back"
                " before non-database work (borrow late, return early), or find the leak that never"
                " ends the transaction; idle_transaction_timeout ends such clients; a bigger pool"
                " would fill the same way",
            )
        ]  # fmt: skip
    if queued and advice.idle_share >= IDLE_SHARE_CULPRIT:
        who = f"app={advice.top_idle_application}" if advice.top_idle_application is not None else None
        mostly = f", mostly application_name={advice.top_idle_application}" if who else ""
        return [
            Verdict(
                IDLE_IN_TRANSACTION_VERDICT, who,
                f"pool exhausted: {advice.idle_share:.0%} of the hold time is idle in transaction"
                f" (p99 hold {advice.hold_p99_ms:.1f} ms){mostly}: clients hold servers across"
                " non-database work (borrow late, return early; commit before calling out)",
            )
        ]  # fmt: skip
    sessions = [d for d in holders if d.state == IDLE and d.holder.idle_s >= long_s]
    if queued and sessions:
        sessions.sort(key=lambda d: d.holder.idle_s, reverse=True)
        return [
            Verdict(
                IDLE_SESSION, describe_view(sessions[0].holder),
                f"{len(sessions)} session-mode client(s) hold a server while idle between"
                f" transactions (longest {sessions[0].holder.idle_s:.1f} s) while others wait:"
                " pool_mode = transaction shares servers between transactions; or close idle"
                " connections (a leak keeps them)",
            )
        ]  # fmt: skip
    return []


def _victims_by_root(holders: list[HolderDiagnosis]) -> dict[int, int]:
    """Lock-waiting holders per root blocker pid."""
    victims: dict[int, int] = {}
    for d in holders:
        if d.state == LOCK_WAIT and d.blocker is not None:
            victims[d.blocker.pid] = victims.get(d.blocker.pid, 0) + 1
    return victims


def _lock_verdicts(holders: list[HolderDiagnosis]) -> list[Verdict]:
    """Step 2: lock chains, named by their root (ours or not), the one with most victims first."""
    victims = _victims_by_root(holders)
    if not victims:
        return []
    roots = {d.blocker.pid: d.blocker for d in holders if d.blocker is not None}
    pid = max(victims, key=lambda p: victims[p])
    root = roots[pid]
    more = f" ({len(victims) - 1} other lock chain(s) too)" if len(victims) > 1 else ""
    return [
        Verdict(
            LOCK_WAIT_VERDICT, root.describe(),
            f"{victims[pid]} client(s) wait on a lock held by {root.describe()}{more}: end or"
            f" shorten that transaction (pg_terminate_backend({pid}) if it is stuck) and keep"
            " lock-holding transactions short; a bigger pool would only queue more clients behind"
            " the lock",
        )
    ]  # fmt: skip


def _slow_verdicts(
    advice: PoolAdvice,
    holders: list[HolderDiagnosis],
    long_s: float,
    queued: bool,
    statements: list[StatementFigures],
    hold_before: Histogram | None,
) -> list[Verdict]:
    """Step 3 (only while clients queue): what makes holds long."""
    if not queued:
        return []
    usual_s = advice.hold_p50_ms / 1e3
    fix = (
        "make it cheaper (EXPLAIN ANALYZE it: an index?) or move it off this pool; statement_timeout"
        " bounds it; a bigger pool would only run more of it at once"
    )
    running = [
        d for d in holders
        if d.state == RUNNING and d.holder.held_s >= long_s and d.holder.held_s >= SLOW_FACTOR * usual_s
    ]  # fmt: skip
    if running:
        longest = max(running, key=lambda d: d.holder.held_s)
        found = fingerprint(longest.statement.encode())
        return [
            Verdict(
                SLOW_STATEMENT, found,
                f"{len(running)} holder(s) running long, longest {longest.holder.held_s:.1f} s:"
                f" {found!r} vs the pool's usual hold (p50) {_ms(usual_s)}: {fix}",
            )
        ]  # fmt: skip
    total = sum(s.total_hold_s for s in statements)
    top = max(statements, key=lambda s: s.total_hold_s, default=None)
    if (
        top is not None
        and top.mean_hold_s >= max(SLOW_FACTOR * usual_s, SLOW_STATEMENT_MIN_S)
        and top.total_hold_s >= SLOW_SHARE * total
    ):
        return [
            Verdict(
                SLOW_STATEMENT, top.fingerprint,
                f"{top.fingerprint!r} holds servers {_ms(top.mean_hold_s)} on average ({top.count}"
                f" transactions, {top.total_hold_s / total:.0%} of all hold time) vs the pool's usual"
                f" hold (p50) {_ms(usual_s)}: {fix}",
            )
        ]  # fmt: skip
    culprit = top.fingerprint if top is not None else None
    heaviest = f"; the statement holding most: {culprit!r}" if culprit else ""
    mean_s = advice.hold_mean_ms / 1e3
    if hold_before is not None and hold_before.count >= MIN_HOLDS_TO_COMPARE:
        before_s = hold_before.mean_s()
        if mean_s >= HOLD_GROWTH * before_s:
            return [
                Verdict(
                    SLOW_STATEMENT, culprit,
                    f"hold time grew: mean hold {_ms(mean_s)} in the window vs {_ms(before_s)}"
                    f" before it{heaviest}: find what holds longer (SHOW HOLDERS, SHOW"
                    " TOP_STATEMENTS); a bigger pool would fill the same way",
                )
            ]  # fmt: skip
    if mean_s > SHORT_HOLD_S:
        return [
            Verdict(
                SLOW_STATEMENT, culprit,
                f"holds are long: mean hold {_ms(mean_s)} (p99 {advice.hold_p99_ms:.1f} ms){heaviest}:"
                " shorten transactions before sizing the pool; a bigger pool would fill the same way",
            )
        ]  # fmt: skip
    return []


def _too_small(advice: PoolAdvice, expected_instances: int) -> Verdict:
    """Step 4: short holds, busy servers, clients queueing: more servers if the server has room."""
    size = advice.pool_size
    wanted = max(size + 1, math.ceil(advice.connections_wanted * HEADROOM_FACTOR))
    why = (
        f"{advice.connections_busy:.2f} of {size} connections busy ({advice.xact_per_s:.1f} xact/s x"
        f" {advice.hold_mean_ms:.2f} ms mean hold), {advice.connections_wanted:.2f} wanted with the waits"
    )
    limits = advice.server_limits
    if limits is None:
        return Verdict(
            POOL_TOO_SMALL, f"{advice.database}/{advice.user}",
            f"pool too small: {why}; holds are short: raise pool_size to ~{wanted} if the server"
            " has room (its max_connections could not be read)",
        )  # fmt: skip
    others = advice.bound_x_instances - size * expected_instances
    fits = (limits.available - others) // expected_instances
    if fits <= size:
        return Verdict(
            SERVER_FULL, f"{advice.database}/{advice.user}",
            f"pool too small for this load ({why}) but the server has no room: {advice.bound_x_instances}"
            f" of {limits.available} server connections are already bound; shorten or spread the"
            " transactions, move reads to a replica, or give this pool slots other pools do not use",
        )  # fmt: skip
    suggested = min(wanted, fits)
    capped = f" (the most max_connections leaves room for: {fits})" if suggested < wanted else ""
    return Verdict(
        POOL_TOO_SMALL, f"{advice.database}/{advice.user}",
        f"pool too small: {why}; holds are short and the server has room: raise pool_size to"
        f" ~{suggested}{capped}; past the server's saturation point (about 2 x its cores) more"
        " connections add contention, not throughput",
    )  # fmt: skip


def _capacity_verdicts(advice: PoolAdvice, expected_instances: int, server: str) -> list[Verdict]:
    """Step 5: the fleet arithmetic (a note when it fits)."""
    limits = advice.server_limits
    if limits is None:
        return []
    bound = advice.bound_x_instances
    if bound <= limits.available:
        advice.notes.append(f"capacity ok: {bound} of {limits.available} server connections at most")
        return []
    per_instance = max(1, limits.available // expected_instances)
    return [
        Verdict(
            FLEET_OVER_MAX_CONNECTIONS, server or None,
            f"over capacity: {expected_instances} instance(s) x pool bounds = {bound} server"
            f" connections > max_connections {limits.max_connections} -"
            f" {limits.reserved_connections} reserved = {limits.available}: expect 'sorry, too many"
            f" clients already'; keep the pool bounds on this server to {per_instance} per instance,"
            " cap the instances, or share one pooler between them",
        )
    ]  # fmt: skip


# --------------------------------------------------------------------------- live inputs


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


def long_hold_s(settings: Settings) -> float:
    """What counts as a long hold: holder_diagnosis_ms, or (PostgreSQL never asked) hold_warn_ms,
    or a second."""
    return (settings.holder_diagnosis_ms or settings.hold_warn_ms or LONG_HOLD_FALLBACK_MS) / 1e3


def statement_figures(pool: Pool) -> list[StatementFigures]:
    return [
        StatementFigures(text, stats.count, stats.hold.sum_ns / NS_PER_S)
        for text, stats in pool.stats.statements.items()
    ]


async def advise(manager: PoolManager, settings: Settings, watch: ActivityWatch) -> list[PoolAdvice]:
    """Advice for every pool, asking PostgreSQL about long holders first (if a round is due)."""
    long_s = long_hold_s(settings)
    long_ns = settings.holder_diagnosis_ms * 1e6
    pools = list(manager.pools.values())
    now = time.monotonic_ns()
    await watch.refresh([(pool, client) for pool in pools for client in long_holders(pool, now, long_ns)])
    now = time.monotonic_ns()
    diagnoses = diagnose_all(pools, watch.reports, now)
    bounds = _bounds_by_server(manager, settings)
    advice = []
    for pool in pools:
        if pool.closed:
            continue
        key = (pool.database, pool.user)
        limits = await watch.limits(pool.login)
        window, apps, window_s = window_of(pool)
        window_start = now - int(window_s * NS_PER_S)
        waiters = [c for c in pool.waiters if c.waiting]
        server = (pool.login.host, pool.login.port)
        advice.append(
            advise_pool(
                pool.database, pool.user, window=window, window_s=window_s, apps=apps,
                holders=[d for d in diagnoses if (d.holder.database, d.holder.user) == key],
                long_s=long_s, waiting_now=len(waiters),
                waited_now_s=sum(now - max(c.wait_started_ns, window_start) for c in waiters) / NS_PER_S,
                oldest_wait_s=max((now - c.wait_started_ns for c in waiters), default=0) / NS_PER_S,
                statements=statement_figures(pool),
                hold_before=pool.snapshots[0].totals.hold if pool.snapshots else None,
                pool_size=pool.size, server_limits=limits,
                bound_x_instances=bounds.get(server, pool.size) * settings.expected_instances,
                expected_instances=settings.expected_instances, server=f"{server[0]}:{server[1]}",
            )
        )  # fmt: skip
    return advice


ADVICE_COLUMNS: Final = [
    "database", "user", "verdict", "culprit", "window_s", "xact_per_s", "holding_now",
    "hold_mean_ms", "hold_p50_ms", "hold_p99_ms", "longest_hold_now_ms", "idle_in_xact_pct",
    "wait_p99_ms", "waited_pct", "waiting_now", "connections_busy", "connections_wanted",
    "pool_size", "query_wait_timeouts", "top_idle_application", "logins_per_s",
    "server_max_connections", "server_connections_available", "bound_x_instances", "advice",
]  # fmt: skip


async def advice_table(
    manager: PoolManager, settings: Settings, watch: ActivityWatch
) -> tuple[list[str], list[list[str | None]]]:
    """SHOW ADVICE: one row per pool, figures as text; `verdict` and `culprit` are the first
    verdict's, `advice` every verdict and note joined by ' | '."""
    rows: list[list[str | None]] = []
    for a in await advise(manager, settings, watch):
        limits = a.server_limits
        first = a.verdict
        rows.append([
            a.database, a.user, first.category, first.culprit, f"{a.window_s:.1f}",
            f"{a.xact_per_s:.1f}", str(a.holding_now), f"{a.hold_mean_ms:.2f}", f"{a.hold_p50_ms:.2f}",
            f"{a.hold_p99_ms:.2f}", f"{a.longest_hold_now_ms:.1f}", f"{a.idle_share * 100:.1f}",
            f"{a.wait_p99_ms:.2f}", f"{a.waited_share * 100:.1f}", str(a.waiting_now),
            f"{a.connections_busy:.2f}", f"{a.connections_wanted:.2f}", str(a.pool_size), str(a.timeouts),
            a.top_idle_application, f"{a.logins_per_s:.1f}",
            str(limits.max_connections) if limits else None, str(limits.available) if limits else None,
            str(a.bound_x_instances),
            " | ".join([*(v.text for v in a.verdicts), *a.notes]),
        ])  # fmt: skip
    return ADVICE_COLUMNS, rows


async def check_capacity(manager: PoolManager, settings: Settings, watch: ActivityWatch) -> list[str]:
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
        limits = await watch.limits(server_login) if server_login else None
        if limits is None:
            continue
        demand = total * settings.expected_instances
        if demand > limits.available:
            line = (
                f"verdict={FLEET_OVER_MAX_CONNECTIONS}: server {key[0]}:{key[1]}:"
                f" {settings.expected_instances} instance(s) x pool bounds {total} = {demand}"
                f" connections > max_connections {limits.max_connections} -"
                f" {limits.reserved_connections} reserved = {limits.available}"
            )
            log.warning("capacity: %s", line)
            warnings.append(line)
    return warnings
