"""The HTTP endpoint as Prometheus and the kubelet use it: HEAD, gzip and OpenMetrics, process
and build metrics after real traffic, and /readyz while the database is down, while full and
while draining."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import codec
from tests.support.poolers import RunningPooler
from tests.support.prometheus import sample, scrape
from tests.support.waiting import eventually

Response = tuple[int, dict[str, str], bytes]


def request(pooler: RunningPooler, method: str, path: str, **headers: str) -> Response:
    """Status, headers and body of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", pooler.pooler.metrics.port, timeout=10)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw_head(pooler: RunningPooler, path: str) -> bytes:
    """Every byte the endpoint sends for a HEAD (http.client would not read a body it sent)."""
    with socket.create_connection(("127.0.0.1", pooler.pooler.metrics.port), timeout=10) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: pypooler\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_head_gets_the_status_and_headers_of_get_and_no_body(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler()
    for path in ("/healthz", "/readyz", "/nowhere"):
        get_status, get_headers, body = request(pooler, "GET", path)
        head_status, head_headers, _ = request(pooler, "HEAD", path)
        assert (head_status, head_headers) == (get_status, get_headers), path
        assert int(get_headers["Content-Length"]) == len(body) > 0
        assert raw_head(pooler, path).endswith(b"\r\n\r\n"), path  # nothing after the headers

    # /metrics changes between two requests (CPU seconds, at least): the same headers, and a
    # length within a few bytes of the body a GET gets.
    _, get_headers, body = request(pooler, "GET", "/metrics")
    status, head_headers, _ = request(pooler, "HEAD", "/metrics")
    assert status == 200 and set(head_headers) == set(get_headers)
    assert head_headers["Content-Type"] == get_headers["Content-Type"]
    assert abs(int(head_headers["Content-Length"]) - len(body)) < 100
    assert raw_head(pooler, "/metrics").endswith(b"\r\n\r\n")

    status, headers, _ = request(pooler, "POST", "/metrics")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_gzip_and_openmetrics_when_the_scraper_asks(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler()
    status, headers, plain = request(pooler, "GET", "/metrics")
    assert status == 200 and "Content-Encoding" not in headers
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")

    status, headers, body = request(pooler, "GET", "/metrics", **{"Accept-Encoding": "gzip, deflate"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert int(headers["Content-Length"]) == len(body) < len(plain)
    names = {family.name for family in text_string_to_metric_families(gzip.decompress(body).decode())}
    assert {"pypooler_build_info", "pypooler_hold_seconds", "process_open_fds"} <= names

    # What Prometheus itself sends.
    accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
    status, headers, body = request(pooler, "GET", "/metrics", Accept=accept, **{"Accept-Encoding": "gzip"})
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert gzip.decompress(body).endswith(b"# EOF\n")


def test_process_and_build_metrics_after_traffic(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler()
    with psycopg.connect(pooler.dsn(application_name="ops"), prepare_threshold=None) as conn:
        assert conn.execute("SELECT 6 * 7").fetchone() == (42,)
        conn.commit()
        found = scrape(pooler.metrics_url)
    # The pooler runs in this process: its descriptors include the client and server sockets.
    open_fds = sample(found["process_open_fds"], "process_open_fds")
    assert 4 <= open_fds < sample(found["process_max_fds"], "process_max_fds")
    assert sample(found["process_resident_memory_bytes"], "process_resident_memory_bytes") > 1 << 20
    assert sample(found["process_cpu_seconds"], "process_cpu_seconds_total") > 0
    (build,) = found["pypooler_build_info"]
    assert build.labels["compiled"] == ("true" if codec.NATIVE else "false")
    hold = sample(found["pypooler_hold_seconds"], "pypooler_hold_seconds_count", application_name="ops")
    assert hold >= 1


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A cluster of this test's own, which it stops (the session's stays up for the others)."""
    with EmbeddedPostgres(max_connections=10) as cluster:
        yield cluster


async def test_readyz_stays_ready_while_the_database_is_down(
    start_pooler: Callable[..., Any], own_postgres: EmbeddedPostgres
) -> None:
    """A database outage leaves the pooler ready (clients get errors naming the server instead
    of no route to the pooler at all); draining at SIGTERM makes it unready."""
    entry = {"host": own_postgres.host, "port": own_postgres.port, "dbname": "pypooler_test", "pool_size": 2}
    pooler = start_pooler(databases={"app": entry}, query_wait_timeout=3, server_connect_timeout=2)
    dsn = pooler.dsn(dbname="app")
    async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
        await conn.execute("SELECT 1")
    assert request(pooler, "GET", "/readyz")[:1] == (200,)

    await asyncio.to_thread(own_postgres.stop_server)
    try:
        pooler.call(lambda: [server.close() for server in list(pooler.pool("app").servers)])
        with pytest.raises(psycopg.OperationalError) as refused:
            async with await psycopg.AsyncConnection.connect(
                dsn, prepare_threshold=None, connect_timeout=10
            ) as conn:
                await conn.execute("SELECT 1")
        # pypooler's own error, naming the server it cannot reach.
        assert f"could not connect to server postgres@127.0.0.1:{own_postgres.port}" in str(refused.value)
        status, _, body = request(pooler, "GET", "/readyz")
        assert (status, body) == (200, b"ready\n")
    finally:
        await asyncio.to_thread(own_postgres.start_server)

    async def answers() -> bool:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
                return (await (await conn.execute("SELECT 42")).fetchone()) == (42,)
        except psycopg.OperationalError:
            return False

    await eventually(answers, timeout=20, interval=0.2)

    pooler.call_async(pooler.pooler.drain(0.5))
    status, _, body = request(pooler, "GET", "/readyz")
    assert (status, body) == (503, b"draining: shutting down\n")
    assert request(pooler, "GET", "/healthz")[0] == 200


async def test_readyz_room_is_unready_while_max_client_conn_clients_are_connected(
    start_pooler: Callable[..., Any],
) -> None:
    pooler = start_pooler(max_client_conn=2)
    assert request(pooler, "GET", "/readyz?room")[0] == 200
    clients = [await psycopg.AsyncConnection.connect(pooler.dsn(), prepare_threshold=None) for _ in range(2)]
    try:
        status, _, body = request(pooler, "GET", "/readyz?room")
        assert (status, body) == (503, b"full: max_client_conn (2) clients connected\n")
        assert request(pooler, "GET", "/readyz")[0] == 200  # the plain probe does not look
    finally:
        for client in clients:
            await client.close()
    await eventually(lambda: request(pooler, "GET", "/readyz?room")[0] == 200)
