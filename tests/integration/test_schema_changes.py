"""Prepared statements after a schema change, through pypooler in transaction mode.

Server-side statements are shared by every client of a pool that prepares the same text (see
prepared.py). A statement prepared *after* a DROP/CREATE/ALTER must be analysed against the new
schema, as PostgreSQL does for a client of its own, and the drivers' recovery from a stale
statement (asyncpg re-prepares on InvalidCachedStatementError, psycopg clears its cache after
DROP/ALTER) must land on a fresh statement, not the stale shared one. The schema change is made
through pypooler (seen there) and on a direct connection (seen only through the error
PostgreSQL reports for a stale plan). Each table name is the test's own.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import psycopg
import pytest

from pypooler.embedded import EmbeddedPostgres

CONNECT_TIMEOUT_S = 30


async def connect(pooler: Any) -> asyncpg.Connection:
    return await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S)


@pytest.fixture
async def direct(postgres: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    """A connection straight to PostgreSQL: a migration that pypooler does not see."""
    conn = await asyncpg.connect(postgres.dsn(dbname="pypooler_test"), timeout=CONNECT_TIMEOUT_S)
    try:
        yield conn
    finally:
        await conn.close()


async def warm_every_server(pooler: Any, text: str, servers: int, *args: Any) -> None:
    """Prepare and run `text` on each of the pool's `servers` at once, so each holds it."""
    conns = [await connect(pooler) for _ in range(servers)]
    try:
        barrier = asyncio.Barrier(servers)

        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.fetch("SELECT pg_backend_pid()")
                await barrier.wait()  # every client holds its own server now
                await (await conn.prepare(text)).fetch(*args)

        await asyncio.wait_for(asyncio.gather(*(run(conn) for conn in conns)), 30)
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.parametrize("ddl_through_pooler", [True, False], ids=["via-pypooler", "direct"])
async def test_new_statement_after_recreate_sees_the_new_result_type(
    start_pooler: Any, direct: asyncpg.Connection, ddl_through_pooler: bool
) -> None:
    pooler = start_pooler(pool_size=2)
    conn = await connect(pooler)
    try:
        await conn.execute("DROP TABLE IF EXISTS sc_result; CREATE TABLE sc_result (col int); "
                           "INSERT INTO sc_result VALUES (1)")  # fmt: skip
        await warm_every_server(pooler, "SELECT col FROM sc_result", 2)
        ddl = conn if ddl_through_pooler else direct
        await ddl.execute("DROP TABLE sc_result; CREATE TABLE sc_result (col text); "
                          "INSERT INTO sc_result VALUES ('one')")  # fmt: skip
        if not ddl_through_pooler:
            # Unseen by pypooler: PostgreSQL's stale-plan error on a statement prepared before
            # the change (as a direct client would get it) is what tells pypooler.
            with pytest.raises(asyncpg.exceptions.FeatureNotSupportedError, match="cached"):
                await warm_every_server(pooler, "SELECT col FROM sc_result", 2)
        # A new name, the same text: analysed now, on whichever server it lands.
        for _ in range(6):
            statement = await conn.prepare("SELECT col FROM sc_result")
            assert [a.type.name for a in statement.get_attributes()] == ["text"]
            assert await statement.fetchval() == "one"
    finally:
        await conn.close()


async def test_new_statement_after_recreate_gets_the_new_parameter_type(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2)
    conn = await connect(pooler)
    try:
        await conn.execute("DROP TABLE IF EXISTS sc_param; CREATE TABLE sc_param (v date)")
        await warm_every_server(pooler, "INSERT INTO sc_param VALUES ($1)", 2, datetime.date(2026, 1, 2))
        await conn.execute("DROP TABLE sc_param; CREATE TABLE sc_param (v time)")
        for _ in range(6):
            statement = await conn.prepare("INSERT INTO sc_param VALUES ($1)")
            assert [p.oid for p in statement.get_parameters()] == [1083]  # time
            await statement.fetch(datetime.time(12, 34, 56))
        assert await conn.fetchval("SELECT count(*) FROM sc_param WHERE v = '12:34:56'") == 6
    finally:
        await conn.close()


@pytest.mark.parametrize("change", ["add-column", "column-type", "recreate-type"])
@pytest.mark.parametrize("ddl_through_pooler", [True, False], ids=["via-pypooler", "direct"])
async def test_asyncpg_statement_cache_recovers(
    start_pooler: Any, direct: asyncpg.Connection, change: str, ddl_through_pooler: bool
) -> None:
    """asyncpg re-prepares on InvalidCachedStatementError (outside a transaction), as against
    PostgreSQL: the re-prepared statement must be a fresh one."""
    pooler = start_pooler(pool_size=2)
    table = f"sc_cache_{change.replace('-', '_')}"
    setup = {
        "add-column": f"CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1)",
        "column-type": f"CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (1)",
        "recreate-type": f"DROP TYPE IF EXISTS {table}_mood CASCADE; CREATE TYPE {table}_mood AS ENUM ('ok');"
        f" CREATE TABLE {table} (a {table}_mood); INSERT INTO {table} VALUES ('ok')",
    }[change]
    migration = {
        "add-column": f"ALTER TABLE {table} ADD COLUMN b int",
        "column-type": f"ALTER TABLE {table} ALTER COLUMN a TYPE text",
        "recreate-type": f"DROP TYPE {table}_mood CASCADE; CREATE TYPE {table}_mood AS ENUM ('fine', 'ok');"
        f" ALTER TABLE {table} ADD COLUMN a {table}_mood DEFAULT 'ok'",
    }[change]
    expected = {"add-column": [(1, None)], "column-type": [("1",)], "recreate-type": [("ok",)]}[change]
    conn = await connect(pooler)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE; {setup}")
        await warm_every_server(pooler, f"SELECT * FROM {table}", 2)
        await conn.fetch(f"SELECT * FROM {table}")  # now in asyncpg's statement cache
        await (conn if ddl_through_pooler else direct).execute(migration)
        for _ in range(6):  # over both servers
            assert [tuple(row.values()) for row in await conn.fetch(f"SELECT * FROM {table}")] == expected
    finally:
        await conn.close()


async def psycopg_outcomes(dsn: str, migrate: Any, table: str, warm: Any = None) -> list[object]:
    """What a psycopg 3 client (every query prepared) sees around a schema change: rows, or the
    SQLSTATE of the error."""
    outcomes: list[object] = []
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, prepare_threshold=0, connect_timeout=CONNECT_TIMEOUT_S
    ) as conn:

        async def run(sql: str) -> None:
            try:
                outcomes.append(await (await conn.execute(sql)).fetchall())
            except psycopg.Error as exc:
                outcomes.append(exc.sqlstate)

        for sql in (f"DROP TABLE IF EXISTS {table}", f"CREATE TABLE {table} (a int)",
                    f"INSERT INTO {table} VALUES (1)"):  # fmt: skip
            await conn.execute(sql)
        if warm is not None:
            await warm(f"SELECT * FROM {table}")
        for _ in range(3):
            await run(f"SELECT * FROM {table}")
        await migrate(conn, f"ALTER TABLE {table} ADD COLUMN b text")
        for _ in range(6):
            await run(f"SELECT * FROM {table}")
    return outcomes


@pytest.mark.parametrize("ddl_through_pooler", [True, False], ids=["via-pypooler", "direct"])
async def test_psycopg_prepared_statements_as_against_postgres(
    start_pooler: Any, postgres: EmbeddedPostgres, direct: asyncpg.Connection, ddl_through_pooler: bool
) -> None:
    """psycopg 3 clears its prepared statements after a DROP/ALTER it ran itself (then prepares
    afresh); after a change made elsewhere its statement fails as it does against PostgreSQL."""
    pooler = start_pooler(pool_size=2)

    async def migrate(conn: psycopg.AsyncConnection[Any], sql: str) -> None:
        if ddl_through_pooler:
            await conn.execute(sql)
        else:
            await direct.execute(sql)

    async def warm(text: str) -> None:
        await warm_every_server(pooler, text, 2)

    expected = await psycopg_outcomes(postgres.dsn(dbname="pypooler_test"), migrate, "sc_psycopg")
    seen = await psycopg_outcomes(pooler.dsn(), migrate, "sc_psycopg", warm)
    assert seen == expected
    if ddl_through_pooler:
        assert expected[-1] == [(1, None)]
