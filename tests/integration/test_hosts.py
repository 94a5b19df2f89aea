"""Several servers behind one [databases] entry (host = "a,b"): round-robin, a dead host
skipped, target_session_attrs following the primary (a simulated one, and a real streaming
standby promoted while clients write), cancels reaching the right host, a cluster stopped under
load failing only the transactions it had."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from pypooler.embedded import EmbeddedPostgres, random_free_port


@pytest.fixture(scope="module")
def second() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(max_connections=10) as pg:
        yield pg


@pytest.fixture(scope="module")
def primary() -> Iterator[EmbeddedPostgres]:
    """A cluster that can have streaming standbys (the failover test stops and restarts it)."""
    with EmbeddedPostgres(max_connections=8, replication=True) as pg:
        yield pg


@pytest.fixture(scope="module")
def standby(primary: EmbeddedPostgres) -> Iterator[EmbeddedPostgres]:
    """A hot standby of `primary`, never promoted."""
    with EmbeddedPostgres.standby_of(primary) as pg:
        yield pg


def entry(*clusters: EmbeddedPostgres | int, **options: Any) -> dict[str, Any]:
    """A [databases] entry over these clusters (an int: a port where nothing listens); its
    `options` (pool_size among them: start_pooler's own pool_size applies only to its default
    entries)."""
    ports = [c if isinstance(c, int) else c.port for c in clusters]
    return {"host": ",".join(f"127.0.0.1:{port}" for port in ports), **options}


def server_ports(pooler: Any) -> list[int]:
    return sorted(pooler.call(lambda: [s.address[1] for s in pooler.pool().servers]))


# What a client sees when the server of its transaction goes away. InternalClientError: asyncpg's
# own race when the backend's FATAL arrives between its prepare and its bind (the same against
# PostgreSQL directly).
IN_FLIGHT_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


async def client_loop(
    pooler: Any,
    transaction: Callable[[asyncpg.Connection], Awaitable[Any]],
    results: list[Any],
    enough: Callable[[], bool],
    *,
    count: int,
    pause_after_error: float = 0,
) -> None:
    """One client running `transaction` up to `count` times (or until `enough()`), appending its
    result, or None when it failed (then a new connection, after `pause_after_error` seconds)."""
    conn = None
    try:
        for _ in range(count):
            try:
                if conn is None:
                    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
                results.append(await transaction(conn))
            except IN_FLIGHT_ERRORS:
                results.append(None)
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(pause_after_error)
            if enough():
                break
    finally:
        if conn is not None:
            conn.terminate()


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
    results: list[bool | None] = []  # None: a failed transaction
    stopped_at: int | None = None

    async def transaction(conn: asyncpg.Connection) -> bool:
        return bool(await conn.fetchval("select true from pg_sleep(0.005)"))

    def enough() -> bool:
        return stopped_at is not None and len(results) > stopped_at + 200

    # bounded: 8 clients x 400 short transactions at most
    clients = [
        asyncio.create_task(client_loop(pooler, transaction, results, enough, count=400)) for _ in range(8)
    ]
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
    failures = results[stopped_at:].count(None)
    assert 0 < failures <= 4  # at most one per server of the stopped cluster: those in flight
    assert all(results[-100:])  # new transactions go to the other cluster
    assert server_ports(pooler) == [postgres.port] * len(server_ports(pooler))


async def test_read_only_lands_on_the_standby(
    start_pooler: Callable[..., Any], primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    options = {"load_balance_hosts": "disable", "target_session_attrs": "read-only", "pool_size": 2}
    pooler = start_pooler(databases={"pypooler_test": entry(primary, standby, **options)})
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await asyncio.wait_for(conn.fetchval("select pg_is_in_recovery()"), 20) is True
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await asyncio.wait_for(conn.execute("create table never_made (x int)"), 20)
    finally:
        await conn.close()
    assert server_ports(pooler) == [standby.port]


FAILOVER_CLIENTS = 4
FAILOVER_WRITES = 1000  # per client at most; the loop ends sooner, once the failover is shown
WRITES_AFTER_PROMOTION = 100  # results seen after the promotion before the clients stop


async def test_read_write_follows_a_promoted_standby(
    start_pooler: Callable[..., Any], primary: EmbeddedPostgres
) -> None:
    """The issue's failover, with a real streaming standby: clients write through an entry
    listing the standby first; the primary stops, the standby is promoted, and new transactions
    write to it, with no configuration change."""
    primary.psql("create table if not exists failover_writes (client int, n int)")
    # Its own standby: a promotion is for good (the module's `standby` stays one).
    promoted = EmbeddedPostgres.standby_of(primary)
    await asyncio.to_thread(promoted.start)
    try:
        options = {"load_balance_hosts": "disable", "target_session_attrs": "read-write", "pool_size": 3}
        pooler = start_pooler(databases={"pypooler_test": entry(promoted, primary, **options)})
        ports: list[int | None] = []  # the server port of each write; None: it failed
        promoted_at: int | None = None

        def writer(number: int) -> Callable[[asyncpg.Connection], Awaitable[int]]:
            written = itertools.count()

            async def write(conn: asyncpg.Connection) -> int:
                port: int = await conn.fetchval(
                    "insert into failover_writes values ($1, $2) returning inet_server_port()",
                    number,
                    next(written),
                )
                await asyncio.sleep(0.01)  # a steady trickle, not a load test
                return port

            return write

        def enough() -> bool:
            return promoted_at is not None and len(ports) > promoted_at + WRITES_AFTER_PROMOTION

        def start_client(number: int) -> asyncio.Task[None]:
            # After an error, a pause: there is no primary for a moment, and no point in spinning.
            loop = client_loop(
                pooler, writer(number), ports, enough, count=FAILOVER_WRITES, pause_after_error=0.05
            )
            return asyncio.create_task(loop)

        clients = [start_client(number) for number in range(FAILOVER_CLIENTS)]
        primary_stopped = False
        try:
            await asyncio.sleep(0.5)
            stopped_at = len(ports)
            assert stopped_at > 0 and set(ports) == {primary.port}  # writes go to the primary only
            assert set(server_ports(pooler)) == {primary.port}
            primary_stopped = True
            await asyncio.to_thread(primary.stop_server)
            await asyncio.to_thread(promoted.promote)
            promoted_at = len(ports)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            if primary_stopped:  # back for the module's `standby`, which streams from it
                await asyncio.to_thread(primary.start_server)
        assert None in ports[stopped_at:]  # the in-flight transactions (and those with no primary) failed
        assert ports[-WRITES_AFTER_PROMOTION // 2 :] == [promoted.port] * (WRITES_AFTER_PROMOTION // 2)
        assert set(server_ports(pooler)) == {promoted.port}
        # Every acknowledged write is on the new primary (the old one sent its WAL as it stopped).
        written = int(promoted.psql("select count(*) from failover_writes"))
        assert written >= ports.count(primary.port) + ports.count(promoted.port)
    finally:
        await asyncio.to_thread(promoted.stop)
