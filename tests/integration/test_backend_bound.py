"""pool_size bounds backends, not only sockets: clients that leave while their query runs (an
application's own timeout, a killed worker) do not pile up backends behind the pool's back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from pypooler.embedded import EmbeddedPostgres
from tests.support.pgwire import RawClient, error_fields
from tests.support.waiting import eventually

POOL_SIZE = 4
CLIENTS = 12
RUN_S = 4.0


async def backends(direct: asyncpg.Connection) -> int:
    """Client backends of the test database, this connection left out."""
    count = await direct.fetchval(
        "select count(*) from pg_stat_activity where datname = 'pypooler_test'"
        " and backend_type = 'client backend' and pid <> pg_backend_pid()"
    )
    return int(count)


async def test_clients_leaving_mid_query_leave_at_most_pool_size_backends(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(pool_size=POOL_SIZE, query_wait_timeout=30)
    direct = await asyncpg.connect(postgres.dsn(dbname="pypooler_test"))
    deadline = time.monotonic() + RUN_S
    abandoned = 0

    async def impatient_client() -> None:
        # Runs an 8 s query, gives up after 0.3 s by closing its socket (no CancelRequest),
        # and tries again: what an application with its own timeout does.
        nonlocal abandoned
        while time.monotonic() < deadline:
            conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
            query = asyncio.ensure_future(conn.execute("select pg_sleep(8)"))
            await asyncio.sleep(0.3)
            conn.terminate()
            abandoned += 1
            await asyncio.gather(query, return_exceptions=True)

    try:
        clients = [asyncio.ensure_future(impatient_client()) for _ in range(CLIENTS)]
        most = 0
        while not all(task.done() for task in clients):
            most = max(most, await backends(direct))
            await asyncio.sleep(0.05)
        await asyncio.gather(*clients)
        assert abandoned > 2 * CLIENTS
        assert most <= POOL_SIZE
        # The abandoned queries were cancelled: their backends end now, not 8 s later.
        await eventually(lambda: sleeps_running(direct, 0))
    finally:
        await direct.close()


async def sleeps_running(direct: asyncpg.Connection, expected: int) -> bool:
    count = await direct.fetchval(
        "select count(*) from pg_stat_activity where query like 'select pg_sleep(%' and state = 'active'"
        " and pid <> pg_backend_pid()"
    )
    return int(count) == expected


async def test_kill_cancels_the_queries_its_servers_were_running(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(pool_size=2)
    direct = await asyncpg.connect(postgres.dsn(dbname="pypooler_test"))
    victims = [await asyncpg.connect(pooler.dsn(), statement_cache_size=0) for _ in range(2)]
    admin = await RawClient.login(pooler.host, pooler.port, database="pgbouncer")
    try:
        queries = [asyncio.ensure_future(v.execute("select pg_sleep(8)")) for v in victims]
        await eventually(lambda: sleeps_running(direct, 2))
        assert error_fields(await admin.query("KILL pypooler_test")) is None
        results = await asyncio.wait_for(asyncio.gather(*queries, return_exceptions=True), 5)
        assert all(isinstance(result, asyncpg.PostgresError | asyncpg.InterfaceError) for result in results)
        # Cancelled, not left running for 8 s behind a closed socket.
        await eventually(lambda: sleeps_running(direct, 0))
    finally:
        await admin.close()
        for victim in victims:
            victim.terminate()
        await direct.close()
