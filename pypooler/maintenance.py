"""The maintenance pass: every timeout and periodic job of the pooler, decided in one place.

Connections never arm a timer of their own. The hot path only records when things happened
(`wait_started_ns`, `idle_since_ns`, `last_used_ns`, `created_ns`, `connected_ns`), and one
pass per process, every `interval` seconds, reads those stamps and decides what has timed out.
This module is the only place where "this has timed out" is decided; pools, clients and the
listener connection expose small methods the pass calls to act on a decision.

What one pass does, in this order:
- per pool: stats settled (`PoolStats.new_pass`); waiters past `query_wait_timeout` failed;
  holders idle in a transaction past `idle_transaction_timeout` ended, past `hold_warn_ms`
  warned about (once per hold), and those whose query ran past `query_timeout` ended; `POST /sql`
  requests past `http_request_timeout` ended; holders
  held past `holder_diagnosis_ms` gathered for the advisor; servers
  older than `server_lifetime` retired (idle ones now, lent ones when released); the listener
  connection closed after `server_idle_timeout` without a channel; idle servers past
  `server_idle_timeout` closed, and `server_check_query` run on those idle for
  `server_check_delay`; connects retried once `server_login_retry` has passed since the last
  failure; the reserve (reserve_pool) opened once a client has waited `reserve_pool_timeout`,
  and closed (with idle servers beyond pool_size) when nobody waits;
  servers opened up to `min_pool_size`; closed servers whose backend has not ended after
  `BACKEND_END_TIMEOUT_S` aborted (ServerConnection.close), their queries cancelled again
  every `CANCEL_AGAIN_S` until then; an automatic pool (made for the "*" entry or a client's
  own user name) noted when it became unused;
- clients idle outside a transaction past `client_idle_timeout` closed (every client is looked
  at, so at most ten times per timeout and once a second, not every pass);
- automatic pools unused for `autodb_idle_timeout` removed (`PoolManager.remove_unused`), and
  after a reap of many, the freed memory handed back (`release_memory`);
- clients not logged in within `client_login_timeout` ended, and HTTP connections whose request
  has not arrived whole within it closed (http_listener.py);
- cancel requests still undelivered after `CANCEL_TIMEOUT_S` abandoned;
- accepting resumed after the process ran out of file descriptors (accepting.py);
- for the holders held past `holder_diagnosis_ms`, at most one round of questions to PostgreSQL
  per pass (activity.py: a task, and at most one a second), and the hog lines its last answers
  support: a lock chain (once a minute per root backend), a statement running past
  `hold_warn_ms` (once per hold); the advisor's connections unused for ADVISOR_IDLE_CLOSE_S
  closed;
- every `stats_period`, a stats snapshot per pool (averages, rates, SHOW ADVICE);
- the log limiter's summaries of suppressed lines written (log_limits.py).

The interval rule: a tenth of the shortest enabled period among query_wait_timeout,
client_login_timeout, idle_transaction_timeout, query_timeout, http_request_timeout (with the HTTP
listener on), client_idle_timeout,
hold_warn_ms, holder_diagnosis_ms, server_idle_timeout, server_lifetime, server_login_retry,
autodb_idle_timeout, stats_period, server_check_delay (with a server_check_query) and (where a
reserve is configured) reserve_pool_timeout, kept within
[MIN_INTERVAL_S, MAX_INTERVAL_S] = [0.05 s, 1 s]. So a timeout fires at most a tenth of itself
late (never more than 1 s, plus event-loop lag), and a pooler with only long timeouts wakes once
a second (which also bounds the fixed CANCEL_TIMEOUT_S, 5 s, to 1 s late). With the defaults
hold_warn_ms (1 s) is the shortest: ten passes a second. RELOAD recomputes it
(`Maintenance.reload`).

What keeps its own clock, and why:
- `server_connect_timeout` bounds one awaited connect (server.py) and the auth_query borrowed
  for a login (pool.py): an `asyncio.timeout` on the awaiting coroutine, which alone knows what
  to undo; nothing is stamped for the pass to read.
- the drain at shutdown (app.py) polls every DRAIN_POLL_S for clients whose transaction
  ended: it runs once, and must close a client within a few milliseconds of its commit,
  finer than the pass's interval.
- the listener connection's reconnect backoff (listening.py) is the pacing of one task's retry
  loop, not a timeout on anything.
- HTTP reads on /metrics (metrics.py), the console client and the advisor's questions to
  PostgreSQL on connections of its own (activity.py: the connect bounded by
  server_connect_timeout, each question by ASK_TIMEOUT_S) are awaited I/O of one task each;
  the pass only starts a round and never waits for it.

Hog lines name their verdict as SHOW ADVICE does (`verdict=idle_in_transaction`,
`verdict=lock_wait`, `verdict=slow_statement`), so a log search and the console agree.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pypooler.activity import ADVISOR_IDLE_CLOSE_S
from pypooler.config import Settings
from pypooler.holders import LOCK_WAIT, RUNNING, ActivityReport, describe_view, diagnose_all
from pypooler.pool import Pool, describe_holder
from pypooler.protocol.errors import (
    ClientIdleTimeout,
    HttpRequestTimeout,
    IdleTransactionTimeout,
    QueryTimeout,
    QueryWaitTimeout,
)
from pypooler.stats import NS_PER_S

if TYPE_CHECKING:
    from pypooler.activity import ActivityWatch
    from pypooler.pool import Holder, PoolManager
    from pypooler.registry import ClientRegistry

log = logging.getLogger("pypooler.maintenance")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl, macOS): nothing to call
        return None
    return trim


MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """After a reap of many pools: collect the cycles their failed logins left (an exception's
    traceback holds its coroutine frames) and hand the freed heap back to the OS. Without it
    RSS crept up with every scan of unknown user names (bench/README.md has the figures)."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


MIN_INTERVAL_S = 0.05  # below this the pass would cost more than the lateness it saves
MAX_INTERVAL_S = 1.0  # with long timeouts only, still one pass a second
INTERVAL_FRACTION = 10  # a timeout fires at most 1/10 of itself late
# Seconds a cancel request may take to reach the postmaster and be taken (it closes the
# connection when done); past that it is abandoned and its server may be lent again.
CANCEL_TIMEOUT_S = 5.0
# Seconds a closed server's backend may take to end (its query cancelled, its Terminate read)
# while it still counts against the pool's bounds; past that its connection is aborted and
# the place given up (a host that stopped answering, a backend that ignores the cancel).
BACKEND_END_TIMEOUT_S = 5.0
# Seconds between cancels of such a backend's query while it has not ended (a cancel that
# arrives before the backend has read the query is ignored).
CANCEL_AGAIN_S = 1.0
# A reap of at least this many pools (a scan of user names, say) is followed by release_memory.
RELEASE_MEMORY_AFTER_POOLS = 100
# A lock chain still there is logged again after this (per root backend).
LOCK_LOG_REPEAT_S = 60.0
LOGGED_ROOTS_MAX = 1000  # lock roots remembered for that; past it the memory starts again


def timed_periods(settings: Settings) -> list[float]:
    """Every period the pass keeps, in seconds, those switched off (0) left out."""
    periods = [
        settings.query_wait_timeout,
        settings.client_login_timeout,
        settings.idle_transaction_timeout,
        settings.query_timeout,
        settings.http_request_timeout if settings.http_listen_addr else 0.0,
        settings.client_idle_timeout,
        settings.hold_warn_ms / 1000,
        settings.holder_diagnosis_ms / 1000,
        settings.server_idle_timeout,
        settings.server_lifetime,
        settings.server_login_retry,
        settings.autodb_idle_timeout,
        settings.stats_period,
        max(1.0, settings.server_check_delay) if settings.server_check_query else 0.0,
    ]
    if settings.reserve_pool_size or any(db.reserve_pool for db in settings.databases.values()):
        periods.append(settings.reserve_pool_timeout)
    return [period for period in periods if period > 0]


def maintenance_interval(settings: Settings) -> float:
    """Seconds between passes: see the module docstring's interval rule."""
    periods = timed_periods(settings)
    if not periods:
        return MAX_INTERVAL_S
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, min(periods) / INTERVAL_FRACTION))


# --------------------------------------------------------------------------- per pool


def maintain_pool(pool: Pool, now_ns: int) -> list[Holder]:
    """One pass over one pool, with the pool's own settings (see the module docstring); returns
    the holders held past holder_diagnosis_ms."""
    settings = pool.settings
    pool.stats.new_pass(now_ns)
    long: list[Holder] = []
    if settings.query_wait_timeout and pool.waiting:
        expire_waiters(pool, now_ns, settings.query_wait_timeout)
    if pool.lent and (
        settings.hold_warn_ms
        or settings.idle_transaction_timeout
        or settings.query_timeout
        or settings.holder_diagnosis_ms
    ):
        long = watch_holders(
            pool, now_ns, settings.idle_transaction_timeout, settings.hold_warn_ms, settings.query_timeout,
            diagnose_ms=settings.holder_diagnosis_ms,
        )  # fmt: skip
    if settings.http_request_timeout and pool.http_clients:
        expire_http_requests(pool, now_ns, settings.http_request_timeout)
    if settings.server_lifetime and pool.servers:
        limit = now_ns - int(settings.server_lifetime * NS_PER_S)
        old = [s for s in pool.servers if s.created_ns <= limit and not s.close_needed]
        if old:
            pool.retire(old)
    idle_timeout = settings.server_idle_timeout
    listener = pool.listener
    if (
        listener is not None
        and listener.empty_since_ns
        and now_ns - listener.empty_since_ns >= idle_timeout * NS_PER_S
    ):
        listener.close_connection()
    if settings.server_check_query and pool.idle:
        # Each idle server at most once per server_check_delay (and once a second).
        limit = now_ns - int(max(1.0, settings.server_check_delay) * NS_PER_S)
        for server in [s for s in pool.idle if max(s.last_used_ns, s.checked_ns) <= limit]:
            pool.check_idle(server, settings.server_check_query, now_ns)
    if idle_timeout and pool.idle:
        limit = now_ns - int(idle_timeout * NS_PER_S)
        # idle is LIFO, so the longest-idle servers are at the front.
        while pool.idle and pool.idle[0].last_used_ns <= limit:
            pool.close_idle(pool.idle[0])
    if pool.retry_at_ns and now_ns >= pool.retry_at_ns:
        pool.retry_connect()
    if pool.reserve_size:
        first_waited = pool.first_wait_started_ns()
        if not first_waited:
            if pool.reserve_open or len(pool.servers) > pool.size:
                pool.close_reserve()
        elif not pool.reserve_open and now_ns - first_waited >= settings.reserve_pool_timeout * NS_PER_S:
            pool.open_reserve()
    if pool.ending:
        pool.abort_ending(now_ns - int(BACKEND_END_TIMEOUT_S * NS_PER_S))
        pool.cancel_ending_again(now_ns - int(CANCEL_AGAIN_S * NS_PER_S))
    if pool.min_size and len(pool.servers) + pool.connecting < pool.min_size:
        pool.keep_min_size()
    if pool.auto:
        if not pool.unused:
            pool.unused_since_ns = 0
        elif not pool.unused_since_ns:
            pool.unused_since_ns = now_ns
    return long


def expire_waiters(pool: Pool, now_ns: int, timeout_s: float) -> None:
    """query_wait_timeout: fail every waiter queued for longer (waiters are FIFO, so the pass
    stops at the first one still within its time)."""
    limit = now_ns - int(timeout_s * NS_PER_S)
    while (client := pool.take_waiter(queued_by_ns=limit)) is not None:
        pool.warn_wait(client, now_ns - client.wait_started_ns, timed_out=True)
        client.fail(
            QueryWaitTimeout(
                f"query_wait_timeout: no server connection for {pool.database}/{pool.user}"
                f" became free within {timeout_s:g} s",
                detail="the database is paused (PAUSE or KILL on the admin console)"
                if pool.paused
                else f"pool_size {pool.size}: all {pool.lent} servers were busy",
                hint="RESUME it on the admin console"
                if pool.paused
                else "transactions hold servers too long, or pool_size is too small",
            )
        )


def watch_holders(
    pool: Pool,
    now_ns: int,
    timeout_s: float,
    warn_ms: float,
    query_timeout_s: float = 0.0,
    *,
    diagnose_ms: float = 0.0,
) -> list[Holder]:
    """Hog detection: end clients idle inside a transaction past `timeout_s`, warn (once per
    hold) about those past `warn_ms`; end clients whose query has run past `query_timeout_s`
    (their server, mid-query, is closed with them); 0 switches each off. Returns the holders
    still holding after `diagnose_ms` (0: none), for the advisor's questions."""
    timeout_ns = timeout_s * NS_PER_S
    warn_ns = warn_ms * 1e6
    query_timeout_ns = query_timeout_s * NS_PER_S
    diagnose_ns = diagnose_ms * 1e6
    long = []
    for client in pool.holders(now_ns):
        if diagnose_ns and now_ns - client.lent_ns >= diagnose_ns:
            long.append(client)  # a client ended below leaves with its server: asking is harmless
        if not client.idle_since_ns:  # the server is working for it
            if query_timeout_ns and now_ns - client.query_start_ns > query_timeout_ns:
                client.fail(
                    QueryTimeout(
                        f"terminating connection due to query_timeout: a query ran for more than"
                        f" {query_timeout_s:g} s",
                        hint="the server's statement_timeout, a little below query_timeout,"
                        " cancels a slow statement without ending the connection",
                    )
                )
            continue
        if not client.idle_in_xact:
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
                "pool %s/%s: verdict=idle_in_transaction: %s has held a server idle in transaction"
                " for %.0f ms",
                pool.database, pool.user, describe_holder(client, now_ns), idle / 1e6,
            )  # fmt: skip
    return long


def log_diagnosed(
    pools: list[Pool],
    long: list[Holder],
    reports: dict[tuple[str, int], ActivityReport],
    now_ns: int,
    warn_ms: float,
    logged: dict[tuple[tuple[str, int], int], int],
) -> None:
    """The hog lines PostgreSQL's latest answers support, about holders held long: a lock chain
    once a minute per root backend (`logged`: when each root was last logged), naming the root
    (and the client holding it, when it is ours); a statement running past `warn_ms`, neither
    idle nor waiting on a lock, once per hold."""
    by_pid = {(c.server.address, c.server.process_id): c for c in long if c.server is not None}
    victims: dict[tuple[tuple[str, int], int], list[str]] = {}
    roots = {}
    for found in diagnose_all(pools, reports, now_ns):
        view = found.holder
        client = by_pid.get((view.server_address, view.server_pid))
        if client is None:
            continue
        if found.state == LOCK_WAIT and found.blocker is not None:
            key = (view.server_address, found.blocker.pid)
            who = f"{view.database}/{view.user} app={view.application_name or '-'}"
            victims.setdefault(key, []).append(who)
            roots[key] = found.blocker
        elif (
            found.state == RUNNING
            and found.asked
            and warn_ms
            and view.held_s * 1e3 > warn_ms
            and not client.hog_warned
        ):
            client.hog_warned = True
            log.warning(
                "pool %s/%s: verdict=slow_statement: %s has run for %.0f ms",
                view.database, view.user, describe_view(view), view.held_s * 1e3,
            )  # fmt: skip
    if len(logged) > LOGGED_ROOTS_MAX:
        logged.clear()
    for key, waiting in victims.items():
        last = logged.get(key)
        if last is not None and now_ns - last < LOCK_LOG_REPEAT_S * NS_PER_S:
            continue
        logged[key] = now_ns
        more = " ..." if len(waiting) > 3 else ""
        log.warning(
            "verdict=lock_wait: %d client(s) wait on a lock held by %s; waiting: %s%s",
            len(waiting), roots[key].describe(), ", ".join(waiting[:3]), more,
        )  # fmt: skip


# --------------------------------------------------------------------------- per process


def expire_http_requests(pool: Pool, now_ns: int, timeout_s: float) -> None:
    """http_request_timeout: end `POST /sql` requests running (or waiting) longer: a wait ends
    with the error, a running statement is interrupted and its backend cancelled (HttpClient.fail)."""
    limit = now_ns - int(timeout_s * NS_PER_S)
    for request in [r for r in pool.http_clients if r.started_ns <= limit]:
        request.fail(
            HttpRequestTimeout(
                f"canceling the request due to http_request_timeout: it ran for more than {timeout_s:g} s",
                hint="page with LIMIT, or move long work off SQL over HTTP",
            )
        )


def expire_idle_clients(pool: Pool, now_ns: int, timeout_s: float) -> None:
    """client_idle_timeout: close clients that have sent nothing for `timeout_s` outside a
    transaction. Idle since: the end of the last request for a client holding a server (session
    mode, pinned), else the start of its last hold (no stamp is kept on the hot path for its
    end: at most one hold's length early), or its connection."""
    limit = now_ns - int(timeout_s * NS_PER_S)
    for client in list(pool.clients):
        if client.waiting or client.closed:
            continue
        if client.server is not None:
            since = client.idle_since_ns if not client.idle_in_xact else 0
        else:
            since = max(client.lent_ns, client.connected_ns)
        if since and since <= limit:
            client.fail(
                ClientIdleTimeout(
                    f"terminating connection due to client_idle_timeout: idle for more than {timeout_s:g} s"
                )
            )


def expire_logins(registry: ClientRegistry, now_ns: int, timeout_s: float) -> None:
    """client_login_timeout: end clients not logged in in time (slowloris). `logging_in` is
    oldest first, so the pass stops at the first one still within its time."""
    limit = now_ns - int(timeout_s * NS_PER_S)
    expired = []
    for client in registry.logging_in:
        if client.connected_ns > limit:
            break
        expired.append(client)
    for client in expired:
        client.login_timed_out(timeout_s)  # it reads its login machine there, so not popped yet
        registry.logging_in.pop(client, None)


def expire_cancels(registry: ClientRegistry, now_ns: int, timeout_s: float) -> None:
    """Abandon cancel requests still in flight after `timeout_s`: the task's own cleanup lets
    the server be lent again."""
    limit = now_ns - int(timeout_s * NS_PER_S)
    for task, started_ns in list(registry.cancels.items()):
        if started_ns <= limit and not task.done():
            registry.cancels.pop(task, None)
            registry.cancel_timed_out(task, timeout_s)


class Maintenance:
    """Runs the pass every `interval` seconds on the running loop; `clock` gives monotonic
    nanoseconds (tests pass a fake one and call `run` themselves)."""

    def __init__(
        self,
        manager: PoolManager,
        registry: ClientRegistry,
        settings: Settings,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        resume_accepting: Callable[[], None] | None = None,
        expire_http: Callable[[int, float], None] | None = None,
        activity: ActivityWatch | None = None,
    ) -> None:
        self.manager = manager
        self.activity = activity  # the advisor's questions to PostgreSQL (activity.py)
        self.answers_seen = 0  # activity.answers when the hog lines last looked
        self.logged_roots: dict[tuple[tuple[str, int], int], int] = {}  # see log_diagnosed
        self.registry = registry
        self.settings = settings
        self.clock = clock
        # accepting.py: called each pass while accepting is paused for want of descriptors.
        self.resume_accepting = resume_accepting
        self.expire_http = expire_http  # http_listener.HttpListener.expire: its slowloris rule
        self.interval = maintenance_interval(settings)
        self.next_snapshot_ns = clock() + int(settings.stats_period * NS_PER_S)
        self.passes = 0
        self.next_idle_check_ns = 0  # client_idle_timeout's own pace (see run)
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def reload(self, settings: Settings) -> None:
        """New settings: a new interval (from the next pass on) and, if stats_period changed,
        a snapshot one new period from now."""
        if settings.stats_period != self.settings.stats_period:
            self.next_snapshot_ns = self.clock() + int(settings.stats_period * NS_PER_S)
        self.settings = settings
        interval = maintenance_interval(settings)
        if interval != self.interval:
            self.interval = interval
            if self._timer is not None:  # a long wait already armed would come too late
                self._timer.cancel()
                self._schedule()

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        try:
            self.run(self.clock())
        except Exception:  # maintenance must never stop running
            log.exception("maintenance pass failed")
        self._schedule()

    def run(self, now_ns: int) -> None:
        """One pass (see the module docstring)."""
        self.passes += 1
        pools = list(self.manager.pools.values())
        long: list[tuple[Pool, Holder]] = []
        for pool in pools:
            long += [(pool, holder) for holder in maintain_pool(pool, now_ns)]
        settings = self.settings
        activity = self.activity
        if activity is not None:
            if long:
                if activity.answers != self.answers_seen:  # a new answer since the last pass
                    self.answers_seen = activity.answers
                    log_diagnosed(
                        pools,
                        [holder for _, holder in long],
                        activity.reports,
                        now_ns,
                        settings.hold_warn_ms,
                        self.logged_roots,
                    )
                if activity.due(now_ns):  # at most one round per pass, and one a second
                    activity.start(long, now_ns)
            activity.close_unused(now_ns - int(ADVISOR_IDLE_CLOSE_S * NS_PER_S))
        registry = self.registry
        if settings.client_idle_timeout and now_ns >= self.next_idle_check_ns:
            # All clients: at most ten times per timeout and once a second, not every pass.
            self.next_idle_check_ns = now_ns + int(min(1.0, settings.client_idle_timeout / 10) * NS_PER_S)
            for pool in list(self.manager.pools.values()):
                expire_idle_clients(pool, now_ns, settings.client_idle_timeout)
        if settings.autodb_idle_timeout and self.manager.auto_pools:
            removed = self.manager.remove_unused(now_ns - int(settings.autodb_idle_timeout * NS_PER_S))
            if removed >= RELEASE_MEMORY_AFTER_POOLS:
                release_memory()
        if settings.client_login_timeout and registry.logging_in:
            expire_logins(registry, now_ns, settings.client_login_timeout)
        if settings.client_login_timeout and self.expire_http is not None:
            self.expire_http(now_ns, settings.client_login_timeout)
        if registry.cancels:
            expire_cancels(registry, now_ns, CANCEL_TIMEOUT_S)
        if self.resume_accepting is not None:
            self.resume_accepting()
        if now_ns >= self.next_snapshot_ns:
            self.manager.take_snapshots()
            period_ns = int(settings.stats_period * NS_PER_S)
            self.next_snapshot_ns += period_ns
            if self.next_snapshot_ns <= now_ns:  # the loop stalled for a period or more
                self.next_snapshot_ns = now_ns + period_ns
        self.manager.log_limiter.flush(now_ns)  # summaries of lines suppressed a while ago
