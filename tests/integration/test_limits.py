"""PgBouncer's limits on servers: max_db_connections, max_user_connections (shared by several
pools), reserve_pool and min_pool_size, with real clients on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from pypooler.embedded import EmbeddedPostgres


def used(pooler: Any, kind: str, name: str) -> int:
    def read() -> int:
        bound = getattr(pooler.pooler.manager, f"{kind}_bounds").get(name)
        return bound.used if bound is not None else 0

    return int(pooler.call(read))


async def hold(dsn: str, seconds: float) -> None:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        await conn.execute(f"select pg_sleep({seconds})")
    finally:
        await conn.close()


def backends(postgres: EmbeddedPostgres, *users: str) -> int:
    """Client backends of pypooler_test for `users`, as PostgreSQL counts them."""
    names = ", ".join(f"'{user}'" for user in users)
    return int(
        postgres.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'pypooler_test'"
            f" AND usename IN ({names}) AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    )


async def test_max_db_connections_bounds_every_pool_of_a_database(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(pool_size=5, max_db_connections=3)
    peak = peak_backends = 0

    async def watch() -> None:
        nonlocal peak, peak_backends
        while True:
            peak = max(peak, used(pooler, "database", "pypooler_test"))
            count = await asyncio.to_thread(backends, postgres, "postgres", "pp_trust")
            peak_backends = max(peak_backends, count)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        users = ["postgres"] * 4 + ["pp_trust"] * 3  # two pools of one database
        await asyncio.wait_for(asyncio.gather(*(hold(pooler.dsn(user=u), 0.3) for u in users)), 20)
    finally:
        watcher.cancel()
    assert peak == 3  # 7 transactions, 2 pools of 5, never more than 3 servers
    assert 0 < peak_backends <= 3  # and PostgreSQL agrees
    # The postgres pool keeps idle servers; a client of the other pool gets one closed to make room.
    assert used(pooler, "database", "pypooler_test") <= 3
    await asyncio.wait_for(hold(pooler.dsn(user="pp_trust"), 0), 10)


async def test_max_user_connections_bounds_a_user_across_databases(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler(pool_size=5, max_user_connections=2)
    dsns = [pooler.dsn(dbname=db) for db in ("pypooler_test", "postgres", "pypooler_test", "postgres")]
    holds = asyncio.gather(*(hold(dsn, 0.3) for dsn in dsns))
    await asyncio.sleep(0.15)
    assert used(pooler, "user", "postgres") == 2
    await asyncio.wait_for(holds, 20)


async def test_the_reserve_opens_after_reserve_pool_timeout_and_closes_after(
    start_pooler: Callable[..., Any],
) -> None:
    pooler = start_pooler(pool_size=1, reserve_pool_size=1, reserve_pool_timeout=0.2)
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(hold(pooler.dsn(), 1), hold(pooler.dsn(), 1)), 10)
    assert time.monotonic() - started < 1.8  # the second did not wait for the first
    deadline = time.monotonic() + 5
    while pooler.server_count() > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert pooler.server_count() == 1  # nobody waits: the reserve server is closed


async def test_min_pool_size_servers_exist_from_the_start_and_come_back(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    target = {"host": postgres.host, "port": postgres.port}
    entry = {**target, "user": "pp_trust", "min_pool_size": 2}
    pooler = start_pooler(databases={"pypooler_test": entry})

    async def servers_become(n: int) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            count = await asyncio.to_thread(backends, postgres, "pp_trust")
            if count == n:
                return count
            await asyncio.sleep(0.1)
        return count

    assert await servers_become(2) == 2  # no client has come yet
    await asyncio.to_thread(postgres.terminate_backends, user="pp_trust")
    assert await servers_become(2) == 2
    assert pooler.server_count(user="pp_trust") == 2


async def test_min_pool_size_keeps_servers_open(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler(pool_size=5, min_pool_size=3)
    await hold(pooler.dsn(), 0)
    deadline = time.monotonic() + 5
    while pooler.server_count() < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert pooler.server_count() == 3


def console_rows(pooler: Any, command: str) -> list[dict[str, str]]:
    result = subprocess.run(
        ["psql", "-X", "--csv", "-w", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "postgres",
         "-d", "pgbouncer", "-c", command],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


async def test_the_console_shows_the_limits(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    target = {"host": postgres.host, "port": postgres.port}
    pooler = start_pooler(
        max_user_connections=7, reserve_pool_size=2,
        databases={"pypooler_test": {**target, "min_pool_size": 1, "max_db_connections": 4}},
    )  # fmt: skip
    await hold(pooler.dsn(), 0)
    (database,) = [r for r in console_rows(pooler, "SHOW DATABASES") if r["name"] == "pypooler_test"]
    assert (database["min_pool_size"], database["reserve_pool"], database["max_connections"]) == (
        "1",
        "2",
        "4",
    )
    assert int(database["current_connections"]) >= 1
    (user,) = [r for r in console_rows(pooler, "SHOW USERS") if r["name"] == "postgres"]
    assert user["max_user_connections"] == "7" and int(user["current_connections"]) >= 1


async def test_the_users_section_sets_a_users_pool_mode_and_bound(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler(
        pool_size=5, users={"pp_trust": {"pool_mode": "session", "max_user_connections": 1}}
    )
    await asyncio.wait_for(asyncio.gather(hold(pooler.dsn(user="pp_trust"), 0.2), hold(pooler.dsn(), 0)), 10)
    assert pooler.pool(user="pp_trust").mode == "session" and pooler.pool().mode == "transaction"
    assert used(pooler, "user", "pp_trust") <= 1
    (user,) = [r for r in console_rows(pooler, "SHOW USERS") if r["name"] == "pp_trust"]
    assert (user["pool_mode"], user["max_user_connections"]) == ("session", "1")


async def test_a_database_entry_sets_startup_parameters_and_a_connect_query(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres, caplog: Any
) -> None:
    entry = {
        "host": postgres.host, "port": postgres.port, "timezone": "America/New_York",
        "connect_query": "set statement_timeout = 12345",
    }  # fmt: skip
    pooler = start_pooler(
        databases={"pypooler_test": entry, "postgres": {**entry, "connect_query": "select 1/0"}}
    )
    conn = await asyncpg.connect(pooler.dsn())
    try:
        assert conn.get_settings().TimeZone == "America/New_York"  # the welcome reports it
        assert await conn.fetchval("show timezone") == "America/New_York"
        assert await conn.fetchval("show statement_timeout") == "12345ms"
    finally:
        await conn.close()
    other = await asyncpg.connect(pooler.dsn(dbname="postgres"))  # its connect_query fails: logged only
    try:
        assert await other.fetchval("select 1") == 1
    finally:
        await other.close()
    assert any("connect_query failed: division by zero" in r.getMessage() for r in caplog.records)


async def test_server_check_query_runs_on_idle_servers(start_pooler: Callable[..., Any], caplog: Any) -> None:
    healthy = start_pooler(server_check_delay=0)  # at most once a second
    failing = start_pooler(server_check_delay=0, server_check_query="select 1/0")
    for pooler in (healthy, failing):
        await hold(pooler.dsn(), 0)
    deadline = time.monotonic() + 10
    while failing.server_count() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert failing.server_count() == 0
    assert any(
        "server_check_query failed, server closed: division by zero" in r.getMessage() for r in caplog.records
    )
    assert healthy.server_count() == 1
    assert healthy.call(lambda: [s.checked_ns for s in healthy.pool().servers])[0] > 0
    await hold(healthy.dsn(), 0)  # still lent as usual


async def test_application_name_add_host(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler(application_name_add_host=True)
    conn = await asyncpg.connect(pooler.dsn(), server_settings={"application_name": "billing"})
    try:
        # The client's own port is only on asyncpg's private transport, which its stubs leave out.
        port = conn._transport.get_extra_info("sockname")[1]  # type: ignore[attr-defined]
        expected = f"billing - 127.0.0.1:{port}"
        assert await conn.fetchval("show application_name") == expected
        assert (
            await conn.fetchval("select application_name from pg_stat_activity where pid = pg_backend_pid()")
            == expected
        )
        await conn.execute("set application_name = 'mine'")  # a later SET is left alone
        assert await conn.fetchval("show application_name") == "mine"
    finally:
        await conn.close()
