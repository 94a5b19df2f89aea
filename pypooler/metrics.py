"""Prometheus metrics, `/healthz` and `/readyz`, served over HTTP from the pooler's own loop.

Rules:
- Nothing happens per event: the collector reads `stats` when Prometheus scrapes and builds
  every metric family then (prometheus-client's custom-collector pattern).
- The HTTP endpoint runs on the pooler's event loop, so a scrape reads the pools between two
  callbacks and always sees consistent numbers; it is tiny and read-only: GET, and HEAD with
  the headers GET would get. Content negotiation (OpenMetrics, gzip) is prometheus-client's.
- Label sets are bounded by stats.py (applications and statements per pool are capped);
  `metrics_per_application = false` drops the application_name split of the histograms.
- /readyz never asks a server (see MetricsServer.ready): a database outage must not take the
  poolers, or a sidecar's application pods, out of their Services.

Every metric of our own is named `pypooler_*` and documented in the README; prometheus-client adds
`process_*` and `python_info`.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import importlib.metadata
import io
import logging
import platform
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from email.message import Message
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from pypooler import __version__
from pypooler.holders import HOLDER_STATES, LOCK_WAIT, ActivityReport, diagnose_all
from pypooler.protocol import codec
from pypooler.revision import GIT_REVISION
from pypooler.stats import BUCKET_BOUNDS_S, Histogram
from pypooler.websocket import transport_name

if TYPE_CHECKING:
    from pypooler.pool import PoolManager
    from pypooler.registry import ClientRegistry

log = logging.getLogger("pypooler.metrics")

POOL_LABELS = ["database", "user"]
APP_LABELS = ["database", "user", "application_name"]
# A scraper or probe sends its request at once; one that does not is closed after this (an
# awaited read of its own connection's task, not a pooler timeout: see maintenance.py).
REQUEST_HEAD_TIMEOUT_S = 10.0
# A request head (line and headers) larger than this is not a scrape or a probe: dropped.
MAX_REQUEST_BYTES = 8192
# zlib's own default. Level 9 (prometheus-client's) took 3.7x the CPU for an 8% smaller body on
# a 16 MB scrape of 50 pools x 21 applications (0.40 s against 0.11 s; either is ~30x smaller).
GZIP_LEVEL = 6
TEXT = "text/plain; charset=utf-8"

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

        # The histograms are most of the series (README, "series per pool"): without the
        # application_name split, one set per pool from the merged stats.
        if self.manager.settings.metrics_per_application:
            histogram_labels = APP_LABELS
            histogram_sources = [
                ([pool.database, pool.user, app], stats)
                for pool in pools
                for app, stats in pool.stats.apps.items()
            ]
        else:
            histogram_labels = POOL_LABELS
            histogram_sources = [([pool.database, pool.user], pool.stats.totals()) for pool in pools]
        for name, attribute, text in TRAFFIC_HISTOGRAMS:
            family = HistogramMetricFamily(name, text, labels=histogram_labels)
            for labels, stats in histogram_sources:
                histogram: Histogram = getattr(stats, attribute)
                family.add_metric(labels, _buckets(histogram), histogram.sum_ns / 1e9)
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
            clients.add_metric([*key, "idle"], max(0, pool.client_count - active - waiting))
            servers.add_metric([*key, "active"], active)
            servers.add_metric([*key, "idle"], len(pool.idle))
            servers.add_metric([*key, "login"], pool.connecting)
            servers.add_metric([*key, "ending"], len(pool.ending))
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
        connected = GaugeMetricFamily(
            "pypooler_clients_connected",
            "Client connections open now, by transport (tcp, unix, websocket; http: HTTP"
            " connections of SQL over HTTP). Their sum is what max_client_conn bounds.",
            labels=["transport"],
        )
        by_transport = Counter(transport_name(client.transport) for client in self.registry.clients)
        by_transport["http"] += self.registry.http_connections
        for name in ("tcp", "unix", "websocket", "http"):
            connected.add_metric([name], by_transport[name])
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


def build_labels() -> dict[str, str]:
    """pypooler_build_info's labels: what is running, for dashboards and bug reports."""
    return {
        "version": __version__,
        "revision": GIT_REVISION,
        "python_version": platform.python_version(),
        "compiled": "true" if codec.NATIVE else "false",  # the mypyc build of the hot path
        "uvloop_version": importlib.metadata.version("uvloop"),
    }


class Reply:
    """One HTTP answer; `encode` renders it for a GET, or for a HEAD without the body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self, status: str, body: bytes, content_type: str = TEXT, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers

    def encode(self, *, with_body: bool) -> bytes:
        # HEAD: the headers a GET would get, Content-Length included (RFC 9110 9.3.2), no body.
        lines = [
            f"HTTP/1.1 {self.status}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers),
            "Connection: close",
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return head + self.body if with_body else head


class MetricsServer:
    """GET or HEAD /metrics, /healthz (alive) and /readyz (accepting clients, not draining)."""

    def __init__(self, manager: PoolManager, registry: ClientRegistry) -> None:
        self.manager = manager
        self.registry = registry
        self.prometheus = CollectorRegistry(auto_describe=False)
        self.prometheus.register(PoolCollector(manager, registry))
        # RSS, CPU seconds, open fds and their limit, start time (Linux: /proc); python_info.
        ProcessCollector(registry=self.prometheus)
        PlatformCollector(registry=self.prometheus)
        Info("pypooler_build", "What is running: version, git revision, Python, compiled hot path, uvloop.",
             registry=self.prometheus).info(build_labels())  # fmt: skip
        self.listening = False  # set by the app once the client listener is up
        self.draining = False  # set by the app when shutdown begins: not ready any more
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_HEAD_TIMEOUT_S)
            request_line, _, header_lines = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            if len(parts) != 3:
                reply, method = Reply("400 Bad Request", b"bad request line\n"), b""
            else:
                method, target = parts[0], parts[1].decode("latin-1")
                headers = http.client.parse_headers(io.BytesIO(header_lines))
                reply = await self._answer(method, urllib.parse.urlsplit(target), headers)
            writer.write(reply.encode(with_body=method != b"HEAD"))
            await writer.drain()
        except (http.client.HTTPException, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, OSError):  # fmt: skip
            pass
        finally:
            writer.close()

    async def _answer(self, method: bytes, target: urllib.parse.SplitResult, headers: Message) -> Reply:
        if method not in (b"GET", b"HEAD"):
            return Reply("405 Method Not Allowed", b"GET or HEAD only\n", headers=(("Allow", "GET, HEAD"),))
        if target.path == "/metrics":
            return await self._metrics(headers)
        if target.path == "/healthz":
            return Reply("200 OK", b"ok\n")
        if target.path == "/readyz":
            ready, reason = self.ready(require_room="room" in urllib.parse.parse_qs(target.query, True))
            return Reply("200 OK" if ready else "503 Service Unavailable", reason.encode() + b"\n")
        return Reply("404 Not Found", b"not found\n")

    async def _metrics(self, headers: Message) -> Reply:
        # The text (or OpenMetrics, when the scraper asks for it) is built here, on the pooler's
        # loop, so it reads the pools between two callbacks; compressing reads no pool, and zlib
        # lets go of the GIL, so a large scrape is compressed off the loop.
        encoder, content_type = choose_encoder(headers.get("Accept", ""))
        body = encoder(self.prometheus)
        if not gzip_accepted(headers.get("Accept-Encoding", "")):
            return Reply("200 OK", body, content_type)
        compressed = await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL)
        return Reply("200 OK", compressed, content_type, headers=(("Content-Encoding", "gzip"),))

    def ready(self, *, require_room: bool = False) -> tuple[bool, str]:
        """Ready: listening and not draining. Servers are not asked: a database that does not
        answer makes clients' logins and queries fail with errors naming it, which serves them
        better than taking every pooler (and, as a sidecar, every application pod) out of its
        Service. `require_room`: also unready while max_client_conn clients are connected, so a
        Service in front of several poolers sends new clients to one that can take them."""
        if self.draining:
            return False, "draining: shutting down"
        if not self.listening:
            return False, "not listening yet"
        limit = self.registry.settings.max_client_conn  # as client.py checks it at login
        if require_room and self.registry.client_count >= limit:
            return False, f"full: max_client_conn ({limit}) clients connected"
        return True, "ready"
