"""The maintenance pass: every timeout and periodic job of the pooler, decided in one place.

Connections never arm a timer of their own. The hot path only records when things happened
(`wait_started_ns`, `idle_since_ns`, `last_used_ns`, `created_ns`, `connected_ns`), and one
pass per process, every `interval` seconds, reads those stamps and decides what has timed out.
This module is the only place where "this has timed out" is decided; pools, clients and the
listener connection expose small methods the pass calls to act on a decision.

What one pass does, in this order:
- per pool: stats settled (`PoolStats.new_pass`); waiters past `query_wait_timeout` failed;
  holders idle in a transaction past `idle_transaction_timeout` ended, past `hold_warn_ms`
  warned about (once per hold); servers older than `server_lifetime` retired (idle ones now,
  lent ones when released); the listener connection closed after `server_idle_timeout` without
  a channel; idle servers past `server_idle_timeout` closed; connects retried once
  `server_login_retry` has passed since the last failure;
- clients not logged in within `client_login_timeout` ended;
- cancel requests still undelivered after `CANCEL_TIMEOUT_S` abandoned;
- accepting resumed after the process ran out of file descriptors (accepting.py);
- every `stats_period`, a stats snapshot per pool (averages, rates, SHOW ADVICE);
- the log limiter's summaries of suppressed lines written (log_limits.py).

The interval rule: a tenth of the shortest enabled period among query_wait_timeout,
client_login_timeout, idle_transaction_timeout, hold_warn_ms, server_idle_timeout,
server_lifetime, server_login_retry and stats_period, kept within [MIN_INTERVAL_S,
MAX_INTERVAL_S] = [0.05 s, 1 s]. So a timeout fires at most a tenth of itself late (never more
than 1 s, plus event-loop lag), and a pooler with only long timeouts wakes once a second (which
also bounds the fixed CANCEL_TIMEOUT_S, 5 s, to 1 s late). With the defaults hold_warn_ms (1 s)
is the shortest: ten passes a second. RELOAD recomputes it (`Maintenance.reload`).

What keeps its own clock, and why:
- `server_connect_timeout` bounds one awaited connect (server.py) and the auth_query borrowed
  for a login (pool.py): an `asyncio.timeout` on the awaiting coroutine, which alone knows what
  to undo; nothing is stamped for the pass to read.
- the drain at shutdown (app.py) polls every DRAIN_POLL_S for clients whose transaction
  ended: it runs once, and must close a client within a few milliseconds of its commit,
  finer than the pass's interval.
- the listener connection's reconnect backoff (listening.py) is the pacing of one task's retry
  loop, not a timeout on anything.
- HTTP reads on /metrics (metrics.py), the console client and the advisor's question to a
  server it opened itself (advisor.py, bounded by server_connect_timeout) are awaited I/O of
  one task each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pypooler.config import Settings
from pypooler.pool import Pool, describe_holder
from pypooler.protocol.errors import IdleTransactionTimeout, QueryWaitTimeout
from pypooler.stats import NS_PER_S

if TYPE_CHECKING:
    from pypooler.client import ClientRegistry
    from pypooler.pool import PoolManager

log = logging.getLogger("pypooler.maintenance")

MIN_INTERVAL_S = 0.05  # below this the pass would cost more than the lateness it saves
MAX_INTERVAL_S = 1.0  # with long timeouts only, still one pass a second
INTERVAL_FRACTION = 10  # a timeout fires at most 1/10 of itself late
# Seconds a cancel request may take to reach the postmaster and be taken (it closes the
# connection when done); past that it is abandoned and its server may be lent again.
CANCEL_TIMEOUT_S = 5.0


def timed_periods(settings: Settings) -> list[float]:
    """Every period the pass keeps, in seconds, those switched off (0) left out."""
    periods = [
        settings.query_wait_timeout,
        settings.client_login_timeout,
        settings.idle_transaction_timeout,
        settings.hold_warn_ms / 1000,
        settings.server_idle_timeout,
        settings.server_lifetime,
        settings.server_login_retry,
        settings.stats_period,
    ]
    return [period for period in periods if period > 0]


def maintenance_interval(settings: Settings) -> float:
    """Seconds between passes: see the module docstring's interval rule."""
    periods = timed_periods(settings)
    if not periods:
        return MAX_INTERVAL_S
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, min(periods) / INTERVAL_FRACTION))


# --------------------------------------------------------------------------- per pool


def maintain_pool(pool: Pool, now_ns: int) -> None:
    """One pass over one pool, with the pool's own settings (see the module docstring)."""
    settings = pool.settings
    pool.stats.new_pass(now_ns)
    if settings.query_wait_timeout and pool.waiting:
        expire_waiters(pool, now_ns, settings.query_wait_timeout)
    if pool.lent and (settings.hold_warn_ms or settings.idle_transaction_timeout):
        watch_holders(pool, now_ns, settings.idle_transaction_timeout, settings.hold_warn_ms)
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
    if idle_timeout and pool.idle:
        limit = now_ns - int(idle_timeout * NS_PER_S)
        # idle is LIFO, so the longest-idle servers are at the front.
        while pool.idle and pool.idle[0].last_used_ns <= limit:
            pool.close_idle(pool.idle[0])
    if pool.retry_at_ns and now_ns >= pool.retry_at_ns:
        pool.retry_connect()


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


def watch_holders(pool: Pool, now_ns: int, timeout_s: float, warn_ms: float) -> None:
    """Hog detection: end clients idle inside a transaction past `timeout_s`, warn (once per
    hold) about those past `warn_ms`; 0 switches either off."""
    timeout_ns = timeout_s * NS_PER_S
    warn_ns = warn_ms * 1e6
    for client in pool.holders(now_ns):
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
                pool.database, pool.user, describe_holder(client, now_ns), idle / 1e6,
            )  # fmt: skip


# --------------------------------------------------------------------------- per process


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
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.settings = settings
        self.clock = clock
        # accepting.py: called each pass while accepting is paused for want of descriptors.
        self.resume_accepting = resume_accepting
        self.interval = maintenance_interval(settings)
        self.next_snapshot_ns = clock() + int(settings.stats_period * NS_PER_S)
        self.passes = 0
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
        for pool in list(self.manager.pools.values()):
            maintain_pool(pool, now_ns)
        settings = self.settings
        registry = self.registry
        if settings.client_login_timeout and registry.logging_in:
            expire_logins(registry, now_ns, settings.client_login_timeout)
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
