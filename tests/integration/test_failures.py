"""Failure semantics: nothing lost, nothing leaked, no other client disturbed."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import asyncpg
import pytest

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import codec
from tests.support.messages import startup_packet
from tests.support.pgwire import RawClient, data_rows, error_fields, raw_exchange


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_client_leaving_mid_transaction_never_returns_a_dirty_server(
    start_pooler: Any, postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(pool_size=1)
    setup = await asyncpg.connect(postgres.dsn(), statement_cache_size=0)
    await setup.execute("drop table if exists leave_mid; create table leave_mid (i int)")
    await setup.close()

    leaver = await RawClient.login(pooler.host, pooler.port)
    pid_before = data_rows(await leaver.query("begin; select pg_backend_pid()"))[0][0]
    assert pid_before is not None
    await leaver.query("insert into leave_mid values (1)")
    leaver.writer.transport.abort()  # vanish without Terminate, mid-transaction

    other = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await other.fetchval("select count(*) from leave_mid") == 0
        assert await other.fetchval("select pg_backend_pid()") != int(pid_before)
        # Not inside someone else's transaction:
        assert await other.fetchval("select txid_current_if_assigned()") is None
    finally:
        await other.close()


async def test_server_killed_mid_transaction(start_pooler: Any, postgres: EmbeddedPostgres) -> None:
    pooler = start_pooler(pool_size=2)
    victim = await RawClient.login(pooler.host, pooler.port)
    bystander = await RawClient.login(pooler.host, pooler.port)
    pid = data_rows(await victim.query("begin; select pg_backend_pid()"))[0][0]
    await bystander.query("begin")  # holds the other server

    await asyncio.to_thread(postgres.psql, f"select pg_terminate_backend({pid})")
    messages = await victim.query("select 1")  # errors, whatever the timing
    fields = error_fields(messages)
    assert fields is not None and fields["S"] == "FATAL"
    with pytest.raises(ConnectionError):
        while True:
            await victim.next_message(timeout=5)
    await victim.close()

    # The bystander's transaction is untouched.
    assert data_rows(await bystander.query("select 2"))[0] == ["2"]
    await bystander.query("commit")
    await bystander.close()
    # The pool replaced the dead server.
    fresh = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await fresh.fetchval("select 3") == 3
    finally:
        await fresh.close()
    assert pooler.pool().stats.errors["server_died"] == 1


async def messages_until_closed(client: RawClient, timeout: float = 10) -> list[tuple[int, bytes]]:
    messages = []
    try:
        while True:
            messages.append(await client.next_message(timeout=timeout))
    except ConnectionError:
        return messages


async def errors_when_backend_killed_mid_query(host: str, port: int, postgres: EmbeddedPostgres) -> list[str]:
    """`severity sqlstate` of every ErrorResponse a client in a query gets before EOF when its
    backend is terminated."""
    client = await RawClient.login(host, port)
    try:
        pid = data_rows(await client.query("select pg_backend_pid()"))[0][0]
        client.send(codec.build_query("select pg_sleep(30)"))
        for _ in range(100):  # until the sleep is running, at most 10 s
            state = await asyncio.to_thread(
                postgres.psql, f"select state from pg_stat_activity where pid = {pid}"
            )
            if "active" in state:
                break
            await asyncio.sleep(0.1)
        await asyncio.to_thread(postgres.psql, f"select pg_terminate_backend({pid})")
        messages = await messages_until_closed(client)
        return [
            f"{fields['S']} {fields['C']}"
            for msg_type, body in messages
            if msg_type == ord("E")
            for fields in [codec.parse_error_fields(body)]
        ]
    finally:
        await client.close()


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_a_killed_backend_ends_its_client_with_one_fatal(
    start_pooler: Any, postgres: EmbeddedPostgres, mode: str
) -> None:
    """As PostgreSQL does: one FATAL (57P01) and the end; node-postgres, for one, treats a second
    error event as unhandled and dies."""
    pooler = start_pooler(pool_size=2, pool_mode=mode)
    direct = await errors_when_backend_killed_mid_query(postgres.host, postgres.port, postgres)
    through = await errors_when_backend_killed_mid_query(pooler.host, pooler.port, postgres)
    assert direct == ["FATAL 57P01"]
    assert through == direct
    assert pooler.pool().stats.errors["server_died"] == 1


async def test_postgres_restart_needs_no_pooler_restart(
    start_pooler: Any, postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(pool_size=3)
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    assert await conn.fetchval("select 1") == 1
    await asyncio.to_thread(postgres.restart)
    await asyncio.sleep(0.2)  # the old servers' EOF reaches the pooler
    # The client connection to pypooler survives: its next transaction gets a fresh server.
    assert await conn.fetchval("select 2") == 2
    await conn.close()
    fresh = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await fresh.fetchval("select 3") == 3
    finally:
        await fresh.close()


async def test_slow_reader_bounds_buffering_of_a_200mb_result(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    client = await RawClient.login(pooler.host, pooler.port)
    rss_start = rss_bytes()
    rss_peak = rss_start
    paused_seen = False
    client.send(codec.build_query("select repeat('x', 2000) from generate_series(1, 100000)"))
    received = 0
    tail = b""
    reads = 0
    while not tail.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = await asyncio.wait_for(client.reader.read(65536), 30)
        assert chunk, "connection closed during the result"
        received += len(chunk)
        tail = (tail + chunk)[-6:]
        reads += 1
        if reads % 200 == 0:  # a slow reader: the pooler must stop reading the server meanwhile
            await asyncio.sleep(0.02)
            rss_peak = max(rss_peak, rss_bytes())
            paused_seen = paused_seen or pooler.call(
                lambda: any(s.reading_paused for s in pooler.pool().servers)
            )
    assert received > 200_000_000
    assert paused_seen, "the server side was never paused for the slow client"
    assert rss_peak - rss_start < 100 * 1024 * 1024
    assert data_rows(await client.query("select 1")) == [["1"]]
    await client.close()


@pytest.mark.parametrize(
    ("packet", "sqlstate", "words"),
    [
        (startup_packet(2 << 16), "08P01", "unsupported frontend protocol 2.0"),
        (startup_packet(3 << 16, b"abcd"), "08P01", "invalid startup packet layout"),
    ],
)
def test_bad_startup_packets_get_a_fatal_error(
    start_pooler: Any, packet: bytes, sqlstate: str, words: str
) -> None:
    # A length word PostgreSQL refuses gets no error, as from PostgreSQL: test_startup_fuzz.
    pooler = start_pooler()
    reply = raw_exchange(pooler.port, packet)
    assert reply[:1] == b"E"
    fields = codec.parse_error_fields(reply[5:])
    assert fields["S"] == "FATAL" and fields["C"] == sqlstate and words in fields["M"]


async def test_garbage_after_login_closes_only_that_client(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    good = await RawClient.login(pooler.host, pooler.port)
    await good.query("begin")
    bad = await RawClient.login(pooler.host, pooler.port)
    bad.send(b"Q\x00\x00\x00\x02")  # length below the minimum of 4
    fields = error_fields(await bad.until_ready())
    assert fields is not None and fields["C"] == "08P01"
    await bad.close()
    assert data_rows(await good.query("select 5")) == [["5"]]
    await good.query("commit")
    await good.close()


async def test_wrong_server_password_is_reported(start_pooler: Any) -> None:
    pooler = start_pooler(user="pp_md5", password="wrong")
    with pytest.raises(asyncpg.PostgresError, match="password authentication failed"):
        await asyncpg.connect(pooler.dsn(), statement_cache_size=0)


@pytest.mark.parametrize(
    ("user", "password"), [("pp_md5", "md5pass"), ("pp_scram", "scrampass"), ("pp_plain", "plainpass")]
)
async def test_server_login_with_password(start_pooler: Any, user: str, password: str) -> None:
    pooler = start_pooler(user=user, password=password, pool_size=1)
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await conn.fetchval("select current_user") == user
    finally:
        await conn.close()


async def test_unreachable_server_fails_fast(start_pooler: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]  # bound, never listening: connections are refused
        pooler = start_pooler(databases={"pypooler_test": {"port": dead_port}})
        with pytest.raises(asyncpg.PostgresError, match="could not connect to server"):
            await asyncio.wait_for(asyncpg.connect(pooler.dsn(), statement_cache_size=0), 10)


async def test_server_login_retry_keeps_waiters_until_the_server_is_back(
    start_pooler: Any, postgres: EmbeddedPostgres
) -> None:
    """With server_login_retry, a client arriving while PostgreSQL is down waits, then succeeds."""
    pooler = start_pooler(pool_size=2, server_login_retry=0.3, query_wait_timeout=20)
    first = await RawClient.login(pooler.host, pooler.port)  # the pool now knows its parameters
    await first.query("select 1")
    await first.close()
    await asyncio.to_thread(postgres.stop_server)
    try:
        pooler.call(lambda: [s.close() for s in list(pooler.pool().servers)])
        client = await RawClient.login(pooler.host, pooler.port)
        client.send(codec.build_query("select 41 + 1"))
        await asyncio.sleep(1.0)  # a few failed connects happen meanwhile
        assert pooler.pool().stats.server_connect_failures >= 1
    finally:
        await asyncio.to_thread(postgres.start_server)
    messages = await client.until_ready(timeout=15)
    assert data_rows(messages) == [["42"]]
    await client.close()


async def test_newer_protocol_minor_is_negotiated_down(start_pooler: Any) -> None:
    pooler = start_pooler()
    client = await RawClient.connect(pooler.host, pooler.port)
    params = b"user\0postgres\0database\0pypooler_test\0_pq_.future_option\0on\0\0"
    client.send(startup_packet((3 << 16) | 2, params))
    messages = await client.until_ready()
    negotiate = [body for msg_type, body in messages if msg_type == ord("v")]
    assert negotiate == [struct.pack("!ii", 0, 1) + b"_pq_.future_option\0"]
    assert data_rows(await client.query("select 1")) == [["1"]]
    await client.close()
