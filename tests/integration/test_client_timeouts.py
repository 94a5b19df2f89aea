"""query_timeout and client_idle_timeout, as PgBouncer has them, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from pypooler.protocol import codec
from tests.support.pgwire import RawClient


async def test_query_timeout_ends_the_client_and_its_server(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler(pool_size=1, query_timeout=0.5)
    conn = await asyncpg.connect(pooler.dsn())
    try:
        with pytest.raises((asyncpg.QueryCanceledError, asyncpg.ConnectionDoesNotExistError)) as ended:
            await asyncio.wait_for(conn.execute("select pg_sleep(5)"), 10)
        if isinstance(ended.value, asyncpg.QueryCanceledError):
            assert "query_timeout" in str(ended.value)
    finally:
        conn.terminate()
    other = await asyncpg.connect(pooler.dsn())  # the pool is not left without its server
    try:
        assert await asyncio.wait_for(other.fetchval("select 1"), 10) == 1
    finally:
        await other.close()


async def test_client_idle_timeout_closes_silent_clients_only(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler(client_idle_timeout=0.6)
    silent = await RawClient.login(pooler.host, pooler.port)
    busy = await asyncpg.connect(pooler.dsn())
    in_transaction = await asyncpg.connect(pooler.dsn())
    await in_transaction.execute("begin")
    try:
        for _ in range(10):
            assert await busy.fetchval("select 1") == 1
            await asyncio.sleep(0.15)
        fatal = codec.parse_error_fields((await silent.next_message(timeout=5))[1])
        assert (fatal["S"], fatal["C"]) == ("FATAL", "57P05") and "client_idle_timeout" in fatal["M"]
        assert await busy.fetchval("select 2") == 2
        assert await in_transaction.fetchval("select 3") == 3  # idle_transaction_timeout's business
    finally:
        await silent.close()
        for conn in (busy, in_transaction):
            conn.terminate()
