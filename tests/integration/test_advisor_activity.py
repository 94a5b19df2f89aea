"""The advisor's own connections to PostgreSQL (activity.py): outside the pool's bound, asked at
most once a second, reused, closed when unused, and abandoned when a question outlasts its bound."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
import psycopg
import pytest

from pypooler import activity
from pypooler.embedded import EmbeddedPostgres
from tests.support.pgwire import RawClient, show
from tests.support.waiting import eventually

DB = "pypooler_test"


def advisor_backends(postgres: EmbeddedPostgres) -> list[int]:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "select pid from pg_stat_activity where application_name = %s", (activity.APPLICATION_NAME,)
        ).fetchall()
    return [row[0] for row in rows]


async def test_an_exhausted_pool_is_diagnosed_on_a_connection_of_its_own(
    start_pooler: Any, postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(pool_size=2, holder_diagnosis_ms=100)
    holders = [
        await asyncpg.connect(
            pooler.dsn(), statement_cache_size=0, server_settings={"application_name": "stuck"}
        )
        for _ in range(2)
    ]
    transactions = [conn.transaction() for conn in holders]
    waiter = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        for conn, transaction in zip(holders, transactions, strict=True):
            await transaction.start()
            await conn.fetchval("select 1")
        waiting = asyncio.create_task(waiter.fetchval("select 2"))  # no server left for it
        rounds_before = pooler.call(lambda: pooler.pooler.activity.rounds)
        started = time.monotonic()
        console = await RawClient.login(pooler.host, pooler.port, database="pgbouncer")
        try:
            await eventually(lambda: pooler.pool().waiting == 1)

            async def diagnosed() -> bool:
                rows = await show(console, "HOLDERS")
                return [r["diagnosis"] for r in rows] == ["idle_in_transaction"] * 2 and bool(
                    advisor_backends(postgres)
                )

            await eventually(diagnosed)
            (row,) = await show(console, "ADVICE")
            assert row["verdict"] == "idle_in_transaction" and (row["culprit"] or "").startswith("app=stuck ")
            assert row["waiting_now"] == "1"
            await asyncio.sleep(1.5)
        finally:
            await console.close()
        # One connection for the advisor besides the pool's two; at most a round a second.
        assert len(advisor_backends(postgres)) == 1 and pooler.server_count() == 2
        rounds = pooler.call(lambda: pooler.pooler.activity.rounds) - rounds_before
        assert 1 <= rounds <= (time.monotonic() - started) / activity.MIN_ROUND_GAP_S + 1
    finally:
        for transaction in transactions:
            await transaction.rollback()
        assert await asyncio.wait_for(waiting, 10) == 2
        for conn in [*holders, waiter]:
            await conn.close()


async def test_the_connection_is_reused_and_closed_once_unused(
    start_pooler: Any, postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(pool_size=1)
    conn = await asyncpg.connect(pooler.dsn())  # makes the pool, whose login the advisor uses
    await conn.close()
    login = pooler.call(lambda: pooler.pool().login)
    address = (login.host, login.port)
    watch = pooler.pooler.activity
    first = pooler.call_async(watch.query(login, address, "select pg_backend_pid()"))
    second = pooler.call_async(watch.query(login, address, "select pg_backend_pid()"))
    assert first == second and advisor_backends(postgres) == [int(first[0][0])]
    pooler.call(lambda: watch.close_unused(time.monotonic_ns()))
    await eventually(lambda: not advisor_backends(postgres))


async def test_a_question_outlasting_its_bound_is_abandoned(
    start_pooler: Any, postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(activity, "ASK_TIMEOUT_S", 0.3)
    pooler = start_pooler(pool_size=1)
    conn = await asyncpg.connect(pooler.dsn())
    await conn.close()
    login = pooler.call(lambda: pooler.pool().login)
    watch = pooler.pooler.activity
    started = time.monotonic()
    assert pooler.call_async(watch.query(login, (login.host, login.port), "select pg_sleep(2)")) is None
    assert time.monotonic() - started < 1.5
    # Its connection was closed: PostgreSQL ends the backend once the sleep returns.
    await eventually(lambda: not advisor_backends(postgres), timeout=10)


async def test_a_statement_running_long_is_logged_with_its_verdict(
    start_pooler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pypooler")
    pooler = start_pooler(pool_size=2, holder_diagnosis_ms=100, hold_warn_ms=300)
    conn = await asyncpg.connect(pooler.dsn(), server_settings={"application_name": "reports"})
    try:
        await conn.fetchval("select pg_sleep(2)")
    finally:
        await conn.close()
    lines = [r.getMessage() for r in caplog.records if "verdict=slow_statement" in r.getMessage()]
    assert len(lines) == 1, lines  # once per hold
    assert "app=reports" in lines[0] and "pg_sleep" in lines[0]
