"""Prometheus metrics, `/healthz` and `/readyz`, served over HTTP from the pooler's own loop.

Rules:
- Nothing happens per event: the collector reads `stats` when Prometheus scrapes and builds
  every metric family then (prometheus-client's custom-collector pattern).
- The HTTP endpoint runs on the pooler's event loop, so a scrape reads the pools between two
  callbacks and always sees consistent numbers; it is tiny, read-only and answers GET only.
- Label sets are bounded by stats.py (applications and statements per pool are capped).

Every metric is named `pypooler_*` and documented in the README.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pypooler.holders import HOLDER_STATES, LOCK_WAIT, ActivityReport, diagnose_all
from pypooler.stats import BUCKET_BOUNDS_S, Histogram

if TYPE_CHECKING:
    from pypooler.pool import PoolManager
    from pypooler.registry import ClientRegistry

log = logging.getLogger("pypooler.metrics")

POOL_LABELS = ["database", "user"]
APP_LABELS = ["database", "user", "application_name"]
READY_PROBE_TIMEOUT_S = 1.0
# A scraper or probe sends its request at once; one that does not is closed after this (an
# awaited read of its own connection's task, not a pooler timeout: see maintenance.py).
REQUEST_HEAD_TIMEOUT_S = 10.0
READY_CACHE_S = 2.0  # a probe result is reused this long, so probes cannot hammer the server
MAX_REQUEST_BYTES = 8192

# (metric name, TrafficStats histogram attribute, help text)
TRAFFIC_HISTOGRAMS = (
    ("pypooler_checkout_wait_seconds", "wait",
     "Time from a client needing a server to getting one (0 when one was idle)."),
    ("pypooler_hold_seconds", "hold",
     "Time a server was lent to a client: the transaction as the pool sees it."),
    ("pypooler_idle_in_transaction_seconds", "idle_in_xact",
     "Part of each hold during which the server had answered and waited on its client."),
    ("pypooler_query_seconds", "query",
     "Time from a client request to the ReadyForQuery that answered it."),
    ("pypooler_client_login_seconds", "login",
     "Time from TCP accept to the welcome ReadyForQuery."),
    ("pypooler_client_connect_to_first_query_seconds", "connect_to_first_query",
     "Time from TCP accept to the client's first transaction."),
)  # fmt: skip

# (metric name without _total, TrafficStats counter attribute, help text)
TRAFFIC_COUNTERS = (
    ("pypooler_transactions", "xact_count", "Transactions (server lends) completed."),
    ("pypooler_queries", "query_count", "Client requests answered by ReadyForQuery."),
    ("pypooler_received_bytes", "bytes_received", "Bytes received from clients."),
    ("pypooler_sent_bytes", "bytes_sent", "Bytes sent to clients."),
    ("pypooler_client_logins", "logins", "Client logins completed."),
    ("pypooler_clients_without_transaction", "clients_without_xact",
     "Clients that connected and left without running a transaction."),
    ("pypooler_pinned_clients", "pinned_total",
     "Clients that kept their server until they left (session_state_policy pin)."),
)  # fmt: skip


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(BUCKET_BOUNDS_S, histogram.counts, strict=False):
        cumulative += count
        buckets.append((repr(bound), cumulative))
    buckets.append(("+Inf", histogram.count))
    return buckets


class PoolCollector(Collector):
    """Builds every pypooler_* family from the pools' stats at scrape time."""

    def __init__(self, manager: PoolManager, registry: ClientRegistry) -> None:
        self.manager = manager
        self.registry = registry

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        return list(self._families())

    def _families(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        pools = list(self.manager.pools.values())
        now = time.monotonic_ns()

        for name, attribute, text in TRAFFIC_HISTOGRAMS:
            family = HistogramMetricFamily(name, text, labels=APP_LABELS)
            for pool in pools:
                for app, stats in pool.stats.apps.items():
                    histogram: Histogram = getattr(stats, attribute)
                    family.add_metric(
                        [pool.database, pool.user, app], _buckets(histogram), histogram.sum_ns / 1e9
                    )
            yield family

        for name, attribute, text in TRAFFIC_COUNTERS:
            counter = CounterMetricFamily(name, text, labels=APP_LABELS)
            for pool in pools:
                for app, stats in pool.stats.apps.items():
                    counter.add_metric([pool.database, pool.user, app], getattr(stats, attribute))
            yield counter

        errors = CounterMetricFamily(
            "pypooler_errors",
            "Errors sent to clients, by reason (query_wait_timeout, max_client_conn, server_died...).",
            labels=[*APP_LABELS, "reason"],
        )
        for pool in pools:
            for app, stats in pool.stats.apps.items():
                for reason, count in stats.errors.items():
                    errors.add_metric([pool.database, pool.user, app, reason], count)
        for reason, count in self.registry.errors.items():  # before a pool was chosen
            errors.add_metric(["", "", "", reason], count)
        yield errors

        session_state = CounterMetricFamily(
            "pypooler_session_state_statements",
            "Statements that leave session state on a server, by kind.",
            labels=[*APP_LABELS, "kind"],
        )
        for pool in pools:
            for app, stats in pool.stats.apps.items():
                for kind, count in stats.session_state.items():
                    session_state.add_metric([pool.database, pool.user, app, kind], count)
        yield session_state

        pinned = GaugeMetricFamily(
            "pypooler_pinned_clients_now",
            "Clients holding a server until they leave (session_state_policy pin), now.",
            labels=APP_LABELS,
        )
        for pool in pools:
            for app, stats in pool.stats.apps.items():
                pinned.add_metric([pool.database, pool.user, app], stats.pinned)
        yield pinned

        connects = CounterMetricFamily(
            "pypooler_server_connects", "Server connections opened.", labels=POOL_LABELS
        )
        connect_failures = CounterMetricFamily(
            "pypooler_server_connect_failures", "Server connects that failed.", labels=POOL_LABELS
        )
        connect_time = HistogramMetricFamily(
            "pypooler_server_connect_seconds", "Server connect and login time.", labels=POOL_LABELS
        )
        clients = GaugeMetricFamily(
            "pypooler_clients",
            "Clients by state: active (holding a server), waiting, idle.",
            labels=[*POOL_LABELS, "state"],
        )
        servers = GaugeMetricFamily(
            "pypooler_servers",
            "Server connections by state: active (lent), idle, login.",
            labels=[*POOL_LABELS, "state"],
        )
        pool_size = GaugeMetricFamily(
            "pypooler_pool_size", "Bound on server connections of the pool.", labels=POOL_LABELS
        )
        min_pool_size = GaugeMetricFamily(
            "pypooler_pool_min_size",
            "Servers the pool keeps open even when idle (min_pool_size).",
            labels=POOL_LABELS,
        )
        reserve_pool = GaugeMetricFamily(
            "pypooler_pool_reserve_open",
            "Servers the pool may open beyond pool_size now (reserve_pool, open after reserve_pool_timeout).",
            labels=POOL_LABELS,
        )
        oldest_wait = GaugeMetricFamily(
            "pypooler_oldest_waiter_seconds",
            "Age of the longest-waiting client (0: none).",
            labels=POOL_LABELS,
        )
        listen_channels = GaugeMetricFamily(
            "pypooler_listen_channels",
            "Channels the pool's listener connection listens on for its clients (listen_mode multiplex).",
            labels=POOL_LABELS,
        )
        statement_count = CounterMetricFamily(
            "pypooler_statement_transactions",
            "Transactions by statement fingerprint (literals stripped; bounded).",
            labels=[*POOL_LABELS, "fingerprint"],
        )
        statement_hold = CounterMetricFamily(
            "pypooler_statement_hold_seconds",
            "Total hold time of transactions by statement fingerprint.",
            labels=[*POOL_LABELS, "fingerprint"],
        )
        for pool in pools:
            key = [pool.database, pool.user]
            pool_stats = pool.stats
            connects.add_metric(key, pool_stats.server_connects)
            connect_failures.add_metric(key, pool_stats.server_connect_failures)
            connect_time.add_metric(
                key, _buckets(pool_stats.server_connect), pool_stats.server_connect.sum_ns / 1e9
            )
            active = pool.lent
            waiting = pool.waiting
            clients.add_metric([*key, "active"], active)
            clients.add_metric([*key, "waiting"], waiting)
            clients.add_metric([*key, "idle"], max(0, len(pool.clients) - active - waiting))
            servers.add_metric([*key, "active"], active)
            servers.add_metric([*key, "idle"], len(pool.idle))
            servers.add_metric([*key, "login"], pool.connecting)
            pool_size.add_metric(key, pool.size)
            min_pool_size.add_metric(key, pool.min_size)
            reserve_pool.add_metric(key, pool.reserve_size if pool.reserve_open else 0)
            listen_channels.add_metric(key, len(pool.listener.map) if pool.listener is not None else 0)
            oldest = next((c.wait_started_ns for c in pool.waiters if c.waiting), None)
            oldest_wait.add_metric(key, (now - oldest) / 1e9 if oldest is not None else 0.0)
            for fingerprint, statement in pool_stats.statements.items():
                statement_count.add_metric([*key, fingerprint], statement.count)
                statement_hold.add_metric([*key, fingerprint], statement.hold.sum_ns / 1e9)
        yield from (
            connects,
            connect_failures,
            connect_time,
            clients,
            servers,
            pool_size,
            min_pool_size,
            reserve_pool,
            listen_channels,
            oldest_wait,
            statement_count,
            statement_hold,
        )

        for kind, bounds, setting in (
            ("database", self.manager.database_bounds, "max_db_connections"),
            ("user", self.manager.user_bounds, "max_user_connections"),
        ):
            limit = GaugeMetricFamily(
                f"pypooler_{kind}_max_connections",
                f"Bound on servers across the pools of a {kind} ({setting}; 0: none).",
                labels=[kind],
            )
            current = GaugeMetricFamily(
                f"pypooler_{kind}_current_connections",
                f"Servers open or connecting across the pools of a {kind}.",
                labels=[kind],
            )
            for name, bound in bounds.items():
                limit.add_metric([name], bound.limit)
                current.add_metric([name], bound.used)
            yield from (limit, current)

        accepted = CounterMetricFamily(
            "pypooler_client_connections", "TCP connections accepted from clients."
        )
        accepted.add_metric([], self.registry.connects)
        yield accepted
        accept_failures = CounterMetricFamily(
            "pypooler_accept_failures",
            "Client connections that could not be accepted for want of file descriptors.",
        )
        accept_failures.add_metric([], self.registry.accept_failures)
        yield accept_failures
        connected = GaugeMetricFamily("pypooler_clients_connected", "Client connections open now.")
        connected.add_metric([], len(self.registry.clients))
        yield connected


class HolderCollector(Collector):
    """pypooler_holders and pypooler_holders_blocked: the holds in progress, classified as SHOW
    HOLDERS does (holders.py) with PostgreSQL's latest answers (`reports`, activity.py's)."""

    def __init__(self, manager: PoolManager, reports: dict[tuple[str, int], ActivityReport]) -> None:
        self.manager = manager
        self.reports = reports  # updated in place by the advisor's rounds

    def collect(self) -> Iterable[GaugeMetricFamily]:
        pools = list(self.manager.pools.values())
        counts = {(pool.database, pool.user, state): 0 for pool in pools for state in HOLDER_STATES}
        for found in diagnose_all(pools, self.reports, time.monotonic_ns()):
            counts[found.holder.database, found.holder.user, found.state] += 1
        holders = GaugeMetricFamily(
            "pypooler_holders",
            "Clients holding a server now, by what it does: running, lock_wait (its backend waits on"
            " a lock another backend holds; known for holds past holder_diagnosis_ms),"
            " idle_in_transaction (it waits on the client), idle (session mode, between transactions).",
            labels=[*POOL_LABELS, "state"],
        )
        blocked = GaugeMetricFamily(
            "pypooler_holders_blocked",
            "Clients holding a server whose backend waits on a lock another backend holds.",
            labels=POOL_LABELS,
        )
        for (database, user, state), count in counts.items():
            holders.add_metric([database, user, state], count)
            if state == LOCK_WAIT:
                blocked.add_metric([database, user], count)
        return [holders, blocked]


class MetricsServer:
    """GET /metrics, /healthz (alive) and /readyz (listening and a server reachable)."""

    def __init__(self, manager: PoolManager, registry: ClientRegistry) -> None:
        self.manager = manager
        self.prometheus = CollectorRegistry(auto_describe=False)
        self.prometheus.register(PoolCollector(manager, registry))
        self.listening = False  # set by the app once the client listener is up
        self.draining = False  # set by the app when shutdown begins: not ready any more
        self._server: asyncio.Server | None = None
        self._ready_until = 0.0
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_HEAD_TIMEOUT_S)
            parts = head[:MAX_REQUEST_BYTES].split(b" ", 2)
            method, path = (parts[0], parts[1].split(b"?")[0]) if len(parts) >= 2 else (b"", b"")
            if method not in (b"GET", b"HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path == b"/metrics":
                body = generate_latest(self.prometheus)
                status, kind = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            elif path == b"/healthz":
                status, body, kind = "200 OK", b"ok\n", "text/plain"
            elif path == b"/readyz":
                ready, reason = await self.ready()
                status = "200 OK" if ready else "503 Service Unavailable"
                body, kind = reason.encode() + b"\n", "text/plain"
            else:
                status, body, kind = "404 Not Found", b"not found\n", "text/plain"
            if method == b"HEAD":
                body = b""
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def ready(self) -> tuple[bool, str]:
        """Ready: clients are accepted and at least one pool can reach its server."""
        if self.draining:
            return False, "draining: shutting down"
        if not self.listening:
            return False, "not listening yet"
        if any(pool.servers for pool in self.manager.pools.values()):
            return True, "ready"
        if time.monotonic() < self._ready_until:
            return True, "ready (recent probe)"
        targets = [t for database in self.manager.settings.databases.values() for t in database.targets()]
        for host, port in targets:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), READY_PROBE_TIMEOUT_S)
            except (OSError, TimeoutError):
                continue
            writer.close()
            self._ready_until = time.monotonic() + READY_CACHE_S
            return True, f"ready ({host}:{port} reachable)"
        return False, "no server reachable"
