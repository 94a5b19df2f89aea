"""RELOAD moving a pool across the session line, with clients connected on both sides of it.

Clients log in with the pool's mode of the moment. A client that logged in under transaction or
statement mode has a rewriting stream and follows every later RELOAD (into session mode too: it
then keeps the next server it borrows until it leaves). A client that logged in under session
mode keeps session mode to the end, because its prepared statements and settings live on its
server only. Servers pass between clients of both kinds and are refitted on the way
(Pool.fit_stream). The clients are asyncpg connections with the default statement cache, so
every parameterized query is a named prepared statement.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

CONNECT_TIMEOUT_S = 30
QUERY_TIMEOUT_S = 10
POLLS = 100
POLL_S = 0.05


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING, logger="pypooler")
    yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def reload_pool_mode(pooler: Any, mode: str) -> None:
    """RELOAD (what SIGHUP and the console's RELOAD call) with every database in `mode`."""
    settings = pooler.pooler.settings
    databases = {name: db.model_copy(update={"pool_mode": mode}) for name, db in settings.databases.items()}
    new = settings.model_copy(update={"pool_mode": mode, "databases": databases})
    assert pooler.call(lambda: pooler.pooler.reload(new)) is True
    assert pooler.call(lambda: pooler.pool().mode) == mode


async def connect(pooler: Any, name: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        pooler.dsn(), timeout=CONNECT_TIMEOUT_S, server_settings={"application_name": name}
    )


async def exercise(conn: asyncpg.Connection, number: int, *, block: bool = True) -> int:
    """Cached statements, a new one, an explicit prepare and (with `block`) a transaction block;
    returns the backend pid of the last statement."""
    assert await conn.fetchval("SELECT $1::int + 1", number) == number + 1
    assert await conn.fetchval(f"SELECT $1::text || '-{number}'", "x") == f"x-{number}"
    statement = await conn.prepare("SELECT $1::int * 3")
    assert await statement.fetchval(number) == number * 3
    if block:
        async with conn.transaction():
            assert await conn.fetchval("SELECT $1::int + 1", number + 1) == number + 2
            assert await conn.fetchval("SELECT $1::int - 1", number) == number - 1
    # Each client keeps its own application_name, whatever server it is on.
    name = conn.get_settings().application_name
    assert await conn.fetchval("SELECT current_setting('application_name')") == name
    pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    return pid


async def close_all(*conns: asyncpg.Connection | None) -> None:
    for conn in conns:
        if conn is not None and not conn.is_closed():
            await conn.close()


async def assert_registry_matches_servers(pooler: Any) -> None:
    """Every client left: the statements the pool names are exactly those its servers hold
    (refitting a server must give back its references)."""

    def check() -> bool:
        pool = pooler.pool()
        held = Counter(
            statement
            for server in pool.servers
            if server.statements is not None
            for statement in server.statements.entries.values()
        )
        # Each server holding a statement holds one reference to it.
        return not pool.clients and {s: s.refs for s in pool.statements} == held

    for _ in range(POLLS):  # the pooler sees the clients leave a moment after they close
        if pooler.call(check):
            return
        await asyncio.sleep(POLL_S)
    named = pooler.call(lambda: list(pooler.pool().statements))
    raise AssertionError(f"statements whose references are not the servers holding them: {named}")


async def test_transaction_to_session(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=3)
    before = await connect(pooler, "before")
    in_block = await connect(pooler, "in_block")
    after = None
    try:
        for number in range(3):
            await exercise(before, number)
        # A transaction open across the RELOAD ends on the server it began on.
        block = in_block.transaction()
        await block.start()
        pid_in_block = await in_block.fetchval("SELECT pg_backend_pid()")
        assert await in_block.fetchval("SELECT $1::int + 1", 7) == 8

        reload_pool_mode(pooler, "session")

        assert await in_block.fetchval("SELECT pg_backend_pid()") == pid_in_block
        await block.commit()
        after = await connect(pooler, "after")
        pids: dict[str, set[int]] = {"before": set(), "in_block": set(), "after": set()}
        for number in range(4):
            pids["after"].add(await exercise(after, number))
            pids["before"].add(await exercise(before, number + 10))
            pids["in_block"].add(await exercise(in_block, number + 20))
        # The new client keeps one server for its session; so do the older ones now, each its own.
        assert all(len(seen) == 1 for seen in pids.values()), pids
        assert len(set.union(*pids.values())) == 3
        assert pids["in_block"] == {pid_in_block}
    finally:
        await close_all(before, in_block, after)


@pytest.mark.parametrize("mode", ["transaction", "statement"])
async def test_session_to_transaction_or_statement(start_pooler: Any, mode: str) -> None:
    pooler = start_pooler(pool_size=2, pool_mode="session")
    before = await connect(pooler, "before")
    first = second = None
    try:
        pid_before = await exercise(before, 1)
        await before.execute("SET work_mem = '1234kB'")  # session state, kept by a session

        reload_pool_mode(pooler, mode)

        first = await connect(pooler, "first")
        second = await connect(pooler, "second")
        block = mode == "transaction"  # statement mode refuses transaction blocks
        pids: set[int] = set()
        for number in range(4):
            # The session-mode client keeps its server, its statements, its settings and its
            # transaction blocks ...
            assert await exercise(before, number) == pid_before
            assert await before.fetchval("SELECT current_setting('work_mem')") == "1234kB"
            # ... so the two new clients share the one server left, a transaction at a time.
            pids.add(await exercise(first, number, block=block))
            pids.add(await exercise(second, number + 100, block=block))
        assert len(pids) == 1 and pid_before not in pids

        await before.close()
        if block:
            # Its server was reset (DISCARD ALL) and serves the new clients now: both servers
            # are in use at once here, and neither has the old session's setting.
            async with first.transaction(), second.transaction():
                rows = []
                for conn in (first, second):
                    row = await conn.fetchrow("SELECT pg_backend_pid(), current_setting('work_mem')")
                    assert row is not None
                    rows.append(row)
            assert {row[0] for row in rows} == {pid_before, *pids}
            assert [row[1] for row in rows] == ["4MB", "4MB"]
        for number in range(3):
            await exercise(first, number, block=block)
            await exercise(second, number, block=block)
    finally:
        await close_all(before, first, second)


async def test_session_to_transaction_with_a_pool_of_one(start_pooler: Any) -> None:
    """The session-mode client has the only server: the new clients wait for it to leave, then
    share that server a transaction at a time."""
    pooler = start_pooler(pool_size=1, pool_mode="session")
    before = await connect(pooler, "before")
    first = second = None
    try:
        pid = await exercise(before, 1)
        reload_pool_mode(pooler, "transaction")
        first = await connect(pooler, "first")
        second = await connect(pooler, "second")
        waiting = asyncio.create_task(first.fetchval("SELECT $1::int + 1", 41))
        assert await exercise(before, 2) == pid
        assert not waiting.done()
        await before.close()
        assert await asyncio.wait_for(waiting, QUERY_TIMEOUT_S) == 42
        for number in range(4):
            assert await exercise(first, number) == pid
            assert await exercise(second, number) == pid
    finally:
        await close_all(before, first, second)
    await assert_registry_matches_servers(pooler)


async def test_there_and_back_on_one_server(start_pooler: Any) -> None:
    """One server goes from a transaction-mode client to a session-mode one and back; the
    transaction-mode client follows the pool into session mode and out again."""
    pooler = start_pooler(pool_size=1)
    follower = await connect(pooler, "follower")
    session = shared = None
    try:
        pid = await exercise(follower, 1)
        reload_pool_mode(pooler, "session")
        session = await connect(pooler, "session")
        assert await exercise(session, 2) == pid
        waiting = asyncio.create_task(exercise(follower, 3))
        await session.close()
        assert await asyncio.wait_for(waiting, QUERY_TIMEOUT_S) == pid
        reload_pool_mode(pooler, "transaction")
        # The follower gives the server back after each transaction again: a pool of one
        # serves it and a new client in turn.
        shared = await connect(pooler, "shared")
        for number in range(4):
            assert await exercise(follower, number) == pid
            assert await exercise(shared, number) == pid
    finally:
        await close_all(follower, session, shared)
    await assert_registry_matches_servers(pooler)
