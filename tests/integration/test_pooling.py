"""Pool bounds, modes and limits with real clients against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from pypooler.embedded import EmbeddedPostgres
from tests.support.pgwire import RawClient, data_rows, error_fields


async def pooler_backends(postgres: EmbeddedPostgres, user: str) -> int:
    return int(
        await asyncio.to_thread(
            postgres.psql,
            f"select count(*) from pg_stat_activity where usename = '{user}'"
            " and backend_type = 'client backend'",
        )
    )


async def test_500_clients_share_a_pool_of_5(start_pooler: Any, postgres: EmbeddedPostgres) -> None:
    """500 concurrent asyncpg clients over pool_size 5 against max_connections 20: all succeed."""
    pooler = start_pooler(pool_size=5, user="pp_trust", max_client_conn=1000)
    seen_backends: set[int] = set()
    max_servers = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal max_servers
        while not stop.is_set():
            max_servers = max(max_servers, pooler.server_count(user="pp_trust"))
            max_servers = max(max_servers, await pooler_backends(postgres, "pp_trust"))
            await asyncio.sleep(0.05)

    async def one_client(i: int) -> None:
        conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0, timeout=60)
        try:
            for _ in range(3):
                assert await conn.fetchval("select $1::int * 2", i) == i * 2
                async with conn.transaction():
                    seen_backends.add(await conn.fetchval("select pg_backend_pid()"))
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch())
    results = await asyncio.wait_for(
        asyncio.gather(*(one_client(i) for i in range(500)), return_exceptions=True), 120
    )
    stop.set()
    await watcher
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert 1 <= len(seen_backends) <= 5
    assert max_servers <= 5
    stats = pooler.pool(user="pp_trust").stats
    assert stats.xact_count >= 500 * 6


async def test_query_wait_timeout_closes_the_waiting_client(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, query_wait_timeout=0.5)
    holder = await RawClient.login(pooler.host, pooler.port)
    await holder.query("begin")  # holds the only server
    waiter = await RawClient.login(pooler.host, pooler.port)
    started = time.monotonic()
    messages = await waiter.query("select 1")
    waited = time.monotonic() - started
    fields = error_fields(messages)
    assert fields is not None and fields["S"] == "FATAL"
    assert "query_wait_timeout" in fields["M"]
    assert 0.4 < waited < 5
    with pytest.raises(ConnectionError):
        await waiter.next_message(timeout=5)
    # The holder is untouched and can finish its transaction.
    assert data_rows(await holder.query("select 7")) == [["7"]]
    await holder.query("commit")
    await holder.close()
    await waiter.close()
    assert pooler.pool().stats.errors["query_wait_timeout"] == 1


async def test_max_client_conn(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2, max_client_conn=3)
    clients = [await RawClient.login(pooler.host, pooler.port) for _ in range(3)]
    with pytest.raises(AssertionError) as refused:
        await RawClient.login(pooler.host, pooler.port)
    fields = refused.value.args[0]
    assert fields["C"] == "53300" and "max_client_conn" in fields["M"]
    for client in clients:
        assert data_rows(await client.query("select 1")) == [["1"]]
        await client.close()


async def test_unknown_database(start_pooler: Any) -> None:
    pooler = start_pooler()
    with pytest.raises(asyncpg.InvalidCatalogNameError, match="no such database"):
        await asyncpg.connect(pooler.dsn(dbname="nope"))


async def test_statement_mode_refuses_transaction_blocks(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2, pool_mode="statement")
    client = await RawClient.login(pooler.host, pooler.port)
    assert data_rows(await client.query("select 1")) == [["1"]]
    assert data_rows(await client.query("select 2; select 3")) == [["2"], ["3"]]
    messages = await client.query("begin")
    fields = error_fields(messages)
    assert fields is not None and "statement pooling mode" in fields["M"]
    assert fields["C"] == "25001"
    await client.close()
    # The server that was inside BEGIN was closed, not reused: a new client is not in a transaction.
    other = await RawClient.login(pooler.host, pooler.port)
    messages = await other.query("select 1")
    assert messages[-1][1] == b"I"
    await other.close()


async def test_session_mode_keeps_and_resets_the_server(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, pool_mode="session")
    first = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    pid = await first.fetchval("select pg_backend_pid()")
    await first.execute("set statement_timeout = '4321ms'")  # session state, allowed here
    assert await first.fetchval("select pg_backend_pid()") == pid
    assert await first.fetchval("show statement_timeout") == "4321ms"
    await first.close()
    second = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    assert await second.fetchval("select pg_backend_pid()") == pid  # reused ...
    assert await second.fetchval("show statement_timeout") == "0"  # ... after DISCARD ALL
    await second.close()


async def test_transaction_mode_shares_one_server(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    a = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    b = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    pid_a = await a.fetchval("select pg_backend_pid()")
    pid_b = await b.fetchval("select pg_backend_pid()")
    assert pid_a == pid_b
    await a.close()
    await b.close()


async def test_client_sockets_get_keepalive_from_the_listener(start_pooler: Any) -> None:
    import socket

    pooler = start_pooler()
    client = await RawClient.login(pooler.host, pooler.port)
    try:

        def keepalive() -> list[int]:
            return [
                c.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                for c in pooler.pooler.registry.clients
            ]

        assert pooler.call(keepalive) == [1]
    finally:
        await client.close()
