"""`POST /sql` requests as clients of their pool (http_client.py): in SHOW CLIENTS, SHOW SERVERS,
SHOW POOLS and SHOW HOLDERS while they run, with transport `http`; counted in the histograms of
their application_name; reached by query_wait_timeout and query_timeout; their HTTP connections
counted against max_client_conn; a borrowed server given a fresh session; hostssl lines matching
HTTPS requests."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from pypooler.protocol import codec
from tests.support.http_requests import CONNECTION_STRING, query_request, read_response
from tests.support.pgwire import RawClient, error_fields, show
from tests.support.poolers import RunningPooler
from tests.support.tlscerts import make_ca
from tests.support.waiting import eventually

APP = "edge-fn"
APP_CONNECTION = f"postgresql://postgres@x/pypooler_test?application_name={APP}"


def http_port(pooler: RunningPooler) -> int:
    port = pooler.pooler.http_port
    assert port is not None
    return port


async def one_query(
    pooler: RunningPooler, sql: str, connection_string: str = CONNECTION_STRING
) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(pooler))
    try:
        writer.write(query_request(sql, connection_string=connection_string))
        return await read_response(reader, timeout=30)
    finally:
        await close(writer)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def test_a_running_request_shows_as_a_client_and_a_holder(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    pooler = start_pooler(pool_size=2, http_listen_addr="127.0.0.1", http_listen_port=0)
    admin = await RawClient.login(pooler.host, pooler.port, database="pgbouncer")
    tcp = await RawClient.login(pooler.host, pooler.port, application_name="tcp-app")
    try:
        slow = asyncio.ensure_future(
            one_query(pooler, "SELECT pg_sleep(1.5)", connection_string=APP_CONNECTION)
        )

        async def request_rows() -> list[dict[str, str | None]]:
            return [row for row in await show(admin, "CLIENTS") if row["application_name"] == APP]

        async def request_running() -> bool:
            return [row["state"] for row in await request_rows()] == ["active"]

        await eventually(request_running)
        (row,) = await request_rows()
        assert row["transport"] == "http" and row["addr"] == "127.0.0.1" and row["user"] == "postgres"
        assert row["local_port"] == str(http_port(pooler)) and row["link"]
        tcp_rows = [r for r in await show(admin, "CLIENTS") if r["application_name"] == "tcp-app"]
        assert [r["transport"] for r in tcp_rows] == ["tcp"]
        servers = [r for r in await show(admin, "SERVERS") if r["application_name"] == APP]
        assert [(s["state"], s["link"]) for s in servers] == [("active", row["ptr"])]
        holders = [r for r in await show(admin, "HOLDERS") if r["application_name"] == APP]
        assert len(holders) == 1 and "pg_sleep" in str(holders[0]["last_statement"])
        (pool,) = [r for r in await show(admin, "POOLS") if r["database"] == "pypooler_test"]
        assert int(str(pool["cl_active"])) == 2 and int(str(pool["sv_active"])) == 1

        status, _ = await slow
        assert status == 200
        assert not [r for r in await show(admin, "CLIENTS") if r["application_name"] == APP]
        # Counted as a TCP client's transaction is: one hold of the request, under its app.
        held = pooler.call(lambda: pooler.pool().stats.for_application(APP).hold.count)
        assert held == 1
    finally:
        await tcp.close()
        await admin.close()


async def test_query_wait_timeout_and_query_timeout_reach_requests(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    pooler = start_pooler(
        pool_size=1, http_listen_addr="127.0.0.1", http_listen_port=0, query_wait_timeout=1, query_timeout=2
    )
    holder = await RawClient.login(pooler.host, pooler.port)
    try:
        await holder.query("BEGIN")  # the one server, held
        status, error = await one_query(pooler, "SELECT 1", connection_string=APP_CONNECTION)
        assert (status, error["code"]) == (400, "08006") and "query_wait_timeout" in str(error["message"])
        await holder.query("ROLLBACK")
    finally:
        await holder.close()

    status, error = await one_query(pooler, "SELECT pg_sleep(30)", connection_string=APP_CONNECTION)
    assert (status, error["code"]) == (400, "57014") and "query_timeout" in str(error["message"])
    errors = pooler.call(lambda: dict(pooler.pool().stats.for_application(APP).errors))
    assert errors == {"query_wait_timeout": 1, "query_timeout": 1}

    async def sleep_gone() -> bool:  # its backend was cancelled, not left running
        status, result = await one_query(
            pooler,
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
        )
        return status == 200 and result["rows"] == [["0"]]

    await eventually(sleep_gone, timeout=10)


async def test_http_connections_count_against_max_client_conn(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    pooler = start_pooler(pool_size=2, http_listen_addr="127.0.0.1", http_listen_port=0, max_client_conn=2)
    kept = [await asyncio.open_connection("127.0.0.1", http_port(pooler)) for _ in range(2)]
    try:
        for reader, writer in kept:  # keep-alive connections: each holds a place
            writer.write(query_request("SELECT 1"))
            assert (await read_response(reader))[0] == 200
        assert pooler.call(lambda: pooler.pooler.registry.client_count) == 2
        refused = await RawClient.connect(pooler.host, pooler.port)
        refused.send(codec.build_startup_message({"user": "postgres", "database": "pypooler_test"}))
        fields = error_fields(await refused.until_ready())
        await refused.close()
        assert fields is not None and fields["C"] == "53300"
        status, error = await one_query(pooler, "SELECT 1")
        assert (status, error["code"]) == (400, "53300")
    finally:
        for _, writer in kept:
            await close(writer)

    async def room_again() -> bool:
        return (await one_query(pooler, "SELECT 1"))[0] == 200

    await eventually(room_again)


async def test_a_borrowed_server_gets_the_session_of_a_fresh_login(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    pooler = start_pooler(pool_size=1, http_listen_addr="127.0.0.1", http_listen_port=0)
    status, before = await one_query(pooler, "SELECT current_setting('TimeZone')")
    assert status == 200
    tcp = await RawClient.login(
        pooler.host, pooler.port, TimeZone="Pacific/Chatham", application_name="tcp-app"
    )
    try:
        messages = await tcp.query("SELECT current_setting('TimeZone')")
        assert error_fields(messages) is None  # the one server now has the TCP client's TimeZone
    finally:
        await tcp.close()
    status, after = await one_query(
        pooler,
        "SELECT current_setting('TimeZone'), current_setting('application_name')",
        connection_string=APP_CONNECTION,
    )
    assert status == 200 and after["rows"] == [[before["rows"][0][0], APP]]  # type: ignore[index]
    assert pooler.server_count() == 1


@pytest.mark.parametrize("hba_line", ["hostssl", "hostnossl"])
async def test_hostssl_lines_match_https_requests(
    start_pooler: Callable[..., RunningPooler], tmp_path: Path, hba_line: str
) -> None:
    ca = make_ca(tmp_path / "ca")
    cert, key = ca.issue("server", "localhost", server=True)
    hba = tmp_path / "hba.conf"
    hba.write_text(f"{hba_line} all all 127.0.0.1/32 trust\n")
    pooler = start_pooler(
        pool_size=1, http_listen_addr="127.0.0.1", http_listen_port=0, client_tls_sslmode="require",
        client_tls_cert_file=cert, client_tls_key_file=key, auth_type="hba", auth_hba_file=str(hba),
    )  # fmt: skip
    context = ssl.create_default_context(cafile=ca.ca_cert)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", http_port(pooler), ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(query_request("SELECT 1"))
        status, body = await read_response(reader)
    finally:
        await close(writer)
    if hba_line == "hostssl":
        assert status == 200, body
    else:
        assert (status, body["code"]) == (400, "28000"), body


async def test_http_request_timeout_ends_a_request_and_cancels_its_query(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    pooler = start_pooler(
        pool_size=1, http_listen_addr="127.0.0.1", http_listen_port=0, http_request_timeout=1
    )
    status, error = await one_query(pooler, "SELECT pg_sleep(30)", connection_string=APP_CONNECTION)
    assert (status, error["code"]) == (400, "57014") and "http_request_timeout" in str(error["message"])
    assert pooler.call(lambda: dict(pooler.pool().stats.for_application(APP).errors)) == {
        "http_request_timeout": 1
    }
    status, result = await one_query(pooler, "SELECT 1")  # the pool serves the next request
    assert (status, result["rows"]) == (200, [["1"]])


async def test_a_keep_alive_connection_logs_in_once_per_connection_string(
    start_pooler: Callable[..., RunningPooler], tmp_path: Path
) -> None:
    """As a TCP client authenticates once per connection: the same connection string again on
    the same connection is not checked again; another one is, and a wrong password is refused."""
    auth_file = tmp_path / "userlist.txt"
    auth_file.write_text('"pp_md5" "md5pass"\n"postgres" "secret"\n')
    pooler = start_pooler(
        pool_size=1, http_listen_addr="127.0.0.1", http_listen_port=0, auth_type="scram-sha-256",
        auth_file=str(auth_file),
    )  # fmt: skip
    good = "postgresql://pp_md5:md5pass@x/pypooler_test"
    wrong = "postgresql://pp_md5:wrong@x/pypooler_test"
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(pooler))
    try:
        answers = []
        for text in (good, good, wrong, good):
            writer.write(query_request("SELECT current_user", connection_string=text))
            status, body = await read_response(reader)
            answers.append((status, body.get("code") or body["rows"]))
    finally:
        await close(writer)
    assert answers == [(200, [["pp_md5"]]), (200, [["pp_md5"]]), (400, "28P01"), (200, [["pp_md5"]])]
