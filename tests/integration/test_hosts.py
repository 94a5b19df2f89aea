"""Several servers behind one [databases] entry (host = "a,b"): round-robin, a dead host
skipped, target_session_attrs following the primary, cancels reaching the right host."""

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
