"""Protocol-level named prepared statements through pypooler in transaction mode.

Drivers run unmodified: asyncpg with its default statement cache, psycopg 3 with prepare=True,
pgbench -M prepared. Pools are tiny so statements land on servers that never saw them, and the
server side is checked in pg_prepared_statements. Raw-protocol scenarios run against PostgreSQL
directly and through pypooler, and must answer alike.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from typing import Any

import asyncpg
import psycopg
import pytest

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from tests.support.messages import SYNC, bind, close, describe, execute, parse
from tests.support.pgwire import RawClient, data_rows

CONNECT_TIMEOUT_S = 30
PGBENCH_TIMEOUT_S = 60


async def server_statements(pooler: Any) -> list[list[str | None]]:
    """Names in pg_prepared_statements of the server a simple Query lands on."""
    client = await RawClient.login(pooler.host, pooler.port)
    try:
        return data_rows(await client.query("SELECT name FROM pg_prepared_statements ORDER BY name"))
    finally:
        await client.close()


async def test_asyncpg_default_statement_cache_200_clients_over_2_servers(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2)

    async def client(number: int) -> list[Any]:
        conn = await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S)
        try:
            seen = []
            for round_number in range(3):
                # Shared texts (every client prepares them) and a text of the client's own.
                seen.append(await conn.fetchval("SELECT $1::int * 2", number))
                seen.append(await conn.fetchval(f"SELECT $1::text || '-{number % 7}'", "x"))
                async with conn.transaction():
                    row = await conn.fetchrow("SELECT $1::int AS n, $2::text AS r", number, str(round_number))
                    assert row is not None
                    seen.append((row["n"], row["r"]))
                statement = await conn.prepare("SELECT $1::int + 1")
                seen.append(await statement.fetchval(number))
            return seen
        finally:
            await conn.close()

    results = await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(200))), 120)
    for number, seen in enumerate(results):
        assert seen == [
            value
            for round_number in range(3)
            for value in (number * 2, f"x-{number % 7}", (number, str(round_number)), number + 1)
        ]
    names = [row[0] for row in await server_statements(pooler)]
    assert names and all(name is not None and name.startswith("PYPOOLER_") for name in names)
    # One server-side statement per distinct text (and asyncpg's introspection), not per client.
    assert len(names) < 40

    def held_by_servers_only() -> bool:
        # Every client left: what the pool still names is exactly what its servers have.
        pool = pooler.pool()
        on_servers = {
            statement for server in pool.servers for statement in server.statements.entries.values()
        }
        return set(pool.statements) == on_servers

    assert pooler.call(held_by_servers_only)


def test_psycopg_prepare_true(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    first = psycopg.connect(pooler.dsn(), autocommit=True, prepare_threshold=0, connect_timeout=10)
    second = psycopg.connect(pooler.dsn(), autocommit=True, prepare_threshold=0, connect_timeout=10)
    try:
        for number in range(4):
            # Both connections name their first statement _pg3_0, with different texts.
            assert first.execute("SELECT %s::int + 1", (number,), prepare=True).fetchone() == (number + 1,)
            text = str(number)
            assert second.execute("SELECT %s::text", (text,), prepare=True).fetchone() == (text,)
        with first.pipeline():
            a = first.execute("SELECT %s::int + 1", (10,), prepare=True)
            b = first.execute("SELECT %s::int * 3", (10,), prepare=True)
        assert (a.fetchone(), b.fetchone()) == ((11,), (30,))
        # A rollback makes psycopg send DEALLOCATE ALL; its statements are prepared again after.
        with first.transaction():
            first.execute("SELECT %s::int", (1,), prepare=True)
            first.execute("ROLLBACK")
            first.execute("BEGIN")
        assert first.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
        assert second.execute("SELECT %s::text", ("still",), prepare=True).fetchone() == ("still",)
        names = {row[0] for row in first.execute("SELECT name FROM pg_prepared_statements").fetchall()}
        assert names and all(name.startswith("PYPOOLER_") for name in names)
    finally:
        first.close()
        second.close()


@pytest.mark.usefixtures("pgbench_prepared_tables")
def test_pgbench_prepared_mode(postgres: EmbeddedPostgres, start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2)
    env = postgres.env()
    env["PGPASSFILE"] = "/nonexistent/pypooler-tests/pgpass"
    result = subprocess.run(
        [postgres.bin("pgbench"), "-n", "-S", "-M", "prepared", "-c", "6", "-j", "2", "-T", "2",
         "-h", pooler.host, "-p", str(pooler.port), "-U", "postgres", "pypooler_test"],
        env=env, capture_output=True, text=True, timeout=PGBENCH_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"^number of failed transactions: 0 ", result.stdout, re.M), result.stdout
    processed = re.search(r"^number of transactions actually processed: (\d+)", result.stdout, re.M)
    assert processed is not None and int(processed.group(1)) > 100


@pytest.fixture(scope="module")
def pgbench_prepared_tables(postgres: EmbeddedPostgres) -> Any:
    env = postgres.env()
    subprocess.run([postgres.bin("pgbench"), "-i", "-q", "-s", "1", "pypooler_test"], env=env,
                   check=True, capture_output=True, timeout=PGBENCH_TIMEOUT_S)  # fmt: skip
    yield
    postgres.psql("DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers")


# --------------------------------------------------------------------------- raw protocol


def summary(messages: list[tuple[int, bytes]]) -> list[str]:
    """Message types, with SQLSTATE and text for errors and values for data rows."""
    shown = []
    for msg_type, body in messages:
        if msg_type == c.B_ERROR_RESPONSE:
            fields = codec.parse_error_fields(body)
            shown.append(f"E {fields['C']} {fields['M']}")
        elif msg_type == c.B_DATA_ROW:
            shown.append(f"D {data_rows([(msg_type, body)])[0]}")
        elif msg_type == c.B_READY_FOR_QUERY:
            shown.append(f"Z {body.decode()}")
        elif msg_type not in (c.B_NOTICE_RESPONSE, c.B_PARAMETER_STATUS):
            shown.append(chr(msg_type))
    return shown


async def exchange(client: RawClient, data: bytes) -> list[str]:
    """Send `data`; collect replies up to as many ReadyForQuery as it has Syncs."""
    client.send(data)
    messages = []
    for _ in range(data.count(SYNC)):
        messages += await client.until_ready()
    return summary(messages)


PIPELINE = [
    parse("s1", "SELECT $1::int * 10", (23,)) + describe("s1") + SYNC,
    # One write, five batches: an error in the second; a failing Parse; a duplicate name
    # (PostgreSQL's 42P05); a Close then a Bind of the closed name.
    bind("s1", parameter=b"1") + execute() + SYNC
    + bind("s1", parameter=b"x") + execute() + bind("s1", parameter=b"2") + execute() + SYNC
    + parse("bad", "SELEC 1") + bind("bad") + execute() + SYNC
    + parse("s1", "SELECT 2") + bind("s1", parameter=b"3") + execute() + SYNC
    + bind("s1", parameter=b"4") + execute() + close("s1") + bind("s1", parameter=b"5") + SYNC,
    parse("s1", "SELECT $1::int * 100", (23,)) + bind("s1", parameter=b"6") + execute() + SYNC,
]  # fmt: skip


async def test_pipelines_with_errors_answer_as_postgresql_does(
    postgres: EmbeddedPostgres, start_pooler: Any
) -> None:
    pooler = start_pooler(pool_size=2)
    direct = await RawClient.login(postgres.host, postgres.port)
    pooled = await RawClient.login(pooler.host, pooler.port)
    holder = await RawClient.login(pooler.host, pooler.port)
    try:
        expected = [await exchange(direct, step) for step in PIPELINE]
        seen = [await exchange(pooled, PIPELINE[0])]
        # Another client takes the server that has s1, so the rest runs where s1 is unknown.
        await holder.query("BEGIN")
        seen += [await exchange(pooled, step) for step in PIPELINE[1:]]
        assert seen == expected, seen
        assert 'E 42P05 prepared statement "s1" already exists' in seen[1]
        await holder.query("COMMIT")
    finally:
        await direct.close()
        await pooled.close()
        await holder.close()


UNNAMED_MISSING = ["E 26000 unnamed prepared statement does not exist", "Z I"]


async def test_the_unnamed_statement_after_the_server_went_back_to_the_pool(
    postgres: EmbeddedPostgres, start_pooler: Any
) -> None:
    """PostgreSQL keeps the unnamed statement until the next Parse or simple Query. Through
    pypooler it is certainly there while the client holds its server (a transaction block, or
    batches pipelined so that the server is kept); later, only if the client lands on the same
    server and nobody replaced it. Otherwise PostgreSQL's error: never another client's unnamed
    statement, and never a hang."""
    pooler = start_pooler(pool_size=2)
    direct = await RawClient.login(postgres.host, postgres.port)
    owner = await RawClient.login(pooler.host, pooler.port)
    other = await RawClient.login(pooler.host, pooler.port)
    holder = await RawClient.login(pooler.host, pooler.port)
    parse_owner = parse("", "SELECT 'owner'") + SYNC
    use = bind() + execute() + SYNC
    try:
        # Pipelined, or in a transaction block: one lend, as on a direct connection.
        pipelined = await exchange(direct, parse_owner + use)
        assert pipelined == ["1", "Z I", "2", "D ['owner']", "C", "Z I"]
        assert await exchange(owner, parse_owner + use) == pipelined
        await owner.query("BEGIN")
        assert await exchange(owner, parse_owner) == ["1", "Z T"]
        assert await exchange(owner, use) == ["2", "D ['owner']", "C", "Z T"]
        await owner.query("COMMIT")

        # In a later lend on the same server (idle servers are reused last-in first-out), as in
        # PostgreSQL.
        separately = [await exchange(direct, parse_owner), await exchange(direct, use)]
        assert separately == [["1", "Z I"], ["2", "D ['owner']", "C", "Z I"]]
        assert [await exchange(owner, parse_owner), await exchange(owner, use)] == separately
        # Another client never reaches the owner's statement, left on that server.
        assert await exchange(other, use) == UNNAMED_MISSING
        assert await exchange(other, describe("") + SYNC) == UNNAMED_MISSING
        assert await exchange(other, bind(portal="p") + execute("p") + SYNC) == UNNAMED_MISSING
        # On the other server it is not there.
        await holder.query("BEGIN")
        assert await exchange(owner, use) == UNNAMED_MISSING
        await holder.query("COMMIT")
        # Back on its server, after another client's simple Query dropped it.
        assert data_rows(await other.query("SELECT 1")) == [["1"]]
        assert await exchange(owner, use) == UNNAMED_MISSING
        # And the client goes on.
        assert await exchange(owner, parse_owner + use) == pipelined
    finally:
        await direct.close()
        await owner.close()
        await other.close()
        await holder.close()


async def test_sql_deallocate_of_a_protocol_statement_is_not_translated(
    postgres: EmbeddedPostgres, start_pooler: Any
) -> None:
    """A documented limit: SQL `DEALLOCATE name` goes to the server as written, where the
    client's protocol-level statement has pypooler's name, so it fails and the statement stays.
    Drivers close statements with the protocol's Close, which is translated."""
    pooler = start_pooler(pool_size=1)
    direct = await RawClient.login(postgres.host, postgres.port)
    pooled = await RawClient.login(pooler.host, pooler.port)
    prepare = parse("s1", "SELECT 41 + 1") + SYNC
    use = bind("s1") + execute() + SYNC
    try:
        for client in (direct, pooled):
            assert await exchange(client, prepare) == ["1", "Z I"]
        assert summary(await direct.query("DEALLOCATE s1")) == ["C", "Z I"]
        assert await exchange(direct, use) == ['E 26000 prepared statement "s1" does not exist', "Z I"]
        assert summary(await pooled.query("DEALLOCATE s1")) == [
            'E 26000 prepared statement "s1" does not exist',
            "Z I",
        ]
        assert await exchange(pooled, use) == ["2", "D ['42']", "C", "Z I"]
        # The protocol's Close is translated: afterwards the client's name is unknown.
        assert await exchange(pooled, close("s1") + use) == [
            "3",
            'E 26000 prepared statement "s1" does not exist',
            "Z I",
        ]
    finally:
        await direct.close()
        await pooled.close()


async def test_lru_eviction_with_a_small_max_prepared_statements(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, max_prepared_statements=2)
    conn = await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S)
    try:
        for _ in range(3):
            for number in range(5):
                assert await conn.fetchval(f"SELECT $1::int + {number}", 1) == 1 + number
        names = await server_statements(pooler)
        assert 1 <= len(names) <= 2
        # Evicted statements come back when used again, on the same server.
        assert await conn.fetchval("SELECT $1::int + 0", 5) == 5
    finally:
        await conn.close()


async def test_max_prepared_statements_zero_passes_names_through(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, max_prepared_statements=0)
    client = await RawClient.login(pooler.host, pooler.port)
    try:
        assert await exchange(client, parse("mine", "SELECT 1") + SYNC) == ["1", "Z I"]
        assert await server_statements(pooler) == [["mine"]]
    finally:
        await client.close()
