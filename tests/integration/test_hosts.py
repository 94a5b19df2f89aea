"""Several servers behind one [databases] entry (host = "a,b"): round-robin, a dead host
skipped, target_session_attrs following the primary, cancels reaching the right host, a cluster
stopped under load failing only the transactions it had."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from pypooler.embedded import EmbeddedPostgres, random_free_port


@pytest.fixture(scope="module")
def second() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(max_connections=10) as pg:
        yield pg


def entry(*clusters: EmbeddedPostgres | int, **options: Any) -> dict[str, Any]:
    """A [databases] entry over these clusters (an int: a port where nothing listens); its
    `options` (pool_size among them: start_pooler's own pool_size applies only to its default
    entries)."""
    ports = [c if isinstance(c, int) else c.port for c in clusters]
    return {"host": ",".join(f"127.0.0.1:{port}" for port in ports), **options}


def server_ports(pooler: Any) -> list[int]:
    return sorted(pooler.call(lambda: [s.address[1] for s in pooler.pool().servers]))


async def hold(pooler: Any, seconds: float) -> None:
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        await conn.execute(f"select pg_sleep({seconds})")
    finally:
        await conn.close()


async def test_round_robin_spreads_servers_over_the_hosts(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres, second: EmbeddedPostgres
) -> None:
    pooler = start_pooler(databases={"pypooler_test": entry(postgres, second, pool_size=4)})
    await asyncio.wait_for(asyncio.gather(*(hold(pooler, 0.3) for _ in range(4))), 20)
    assert server_ports(pooler) == sorted([postgres.port] * 2 + [second.port] * 2)


async def test_a_dead_host_is_skipped(start_pooler: Callable[..., Any], postgres: EmbeddedPostgres) -> None:
    dead = random_free_port()
    options = {"load_balance_hosts": "disable", "pool_size": 3}
    pooler = start_pooler(databases={"pypooler_test": entry(dead, postgres, **options)})
    await asyncio.wait_for(asyncio.gather(*(hold(pooler, 0.2) for _ in range(3))), 20)
    assert server_ports(pooler) == [postgres.port] * 3
    hosts = pooler.call(lambda: pooler.pool().login.hosts)
    now = pooler.call(lambda: pooler.loop.time())
    assert hosts.order(now)[0][1] == postgres.port  # the dead one is tried last for a while...
    assert hosts.order(now + 60)[0][1] == dead  # ...then first again, as written


async def test_read_write_follows_the_primary(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres, second: EmbeddedPostgres
) -> None:
    second.psql("alter system set default_transaction_read_only = on")
    second.psql("select pg_reload_conf()")
    try:
        options = {"load_balance_hosts": "disable", "target_session_attrs": "read-write"}
        pooler = start_pooler(databases={"pypooler_test": entry(second, postgres, pool_size=2, **options)})
        await asyncio.wait_for(hold(pooler, 0), 20)
        assert server_ports(pooler) == [postgres.port]
        # A "failover": the second cluster becomes the writable one, the first read-only.
        second.psql("alter system reset default_transaction_read_only")
        second.psql("select pg_reload_conf()")
        postgres.psql("alter system set default_transaction_read_only = on")
        postgres.psql("select pg_reload_conf()")
        pooler.call(lambda: pooler.pool().reconnect())
        await asyncio.wait_for(hold(pooler, 0), 20)
        assert server_ports(pooler) == [second.port]
    finally:
        for cluster in (postgres, second):
            cluster.psql("alter system reset default_transaction_read_only")
            cluster.psql("select pg_reload_conf()")


async def test_a_cancel_reaches_the_host_of_its_server(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres, second: EmbeddedPostgres
) -> None:
    dead = random_free_port()
    options = {"load_balance_hosts": "disable"}
    pooler = start_pooler(databases={"pypooler_test": entry(dead, second, pool_size=1, **options)})
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        with pytest.raises(asyncio.TimeoutError):  # asyncpg sends a CancelRequest on timeout
            await conn.execute("select pg_sleep(30)", timeout=0.5)
        assert await asyncio.wait_for(conn.fetchval("select 1"), 5) == 1
    finally:
        await conn.close()
    assert server_ports(pooler) == [second.port]


async def test_a_cluster_stopped_under_load_fails_only_its_transactions(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres, second: EmbeddedPostgres
) -> None:
    options = {"pool_size": 4}
    pooler = start_pooler(
        query_wait_timeout=20, databases={"pypooler_test": entry(postgres, second, **options)}
    )
    results: list[bool] = []
    stopped_at: int | None = None

    async def client() -> None:
        conn = None
        try:
            for _ in range(400):  # bounded: 8 clients x 400 short transactions at most
                try:
                    if conn is None:
                        conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
                    await conn.fetchval("select pg_sleep(0.005)")
                    results.append(True)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
                    # InternalClientError: asyncpg's own race when the backend's FATAL arrives
                    # between its prepare and its bind (the same against PostgreSQL directly).
                    results.append(False)
                    if conn is not None:
                        conn.terminate()
                    conn = None
                if stopped_at is not None and len(results) > stopped_at + 200:
                    break
        finally:
            if conn is not None:
                conn.terminate()

    clients = [asyncio.create_task(client()) for _ in range(8)]
    try:
        await asyncio.sleep(1)
        assert set(server_ports(pooler)) == {postgres.port, second.port}
        stopped_at = len(results)
        await asyncio.to_thread(second.stop_server)
        try:
            await asyncio.wait_for(asyncio.gather(*clients), 60)
        finally:
            await asyncio.to_thread(second.start_server)
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    failures = results[stopped_at:].count(False)
    assert 0 < failures <= 4  # at most one per server of the stopped cluster: those in flight
    assert all(results[-100:])  # new transactions go to the other cluster
    assert server_ports(pooler) == [postgres.port] * len(server_ports(pooler))
