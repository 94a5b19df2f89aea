"""Why is the pool exhausted? Metrics, advice and hog detection must name the culprit."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from typing import Any

import asyncpg
import pytest

from pypooler import advisor
from tests.support.prometheus import sample, scrape

HOLD_S = 0.5  # what the culprit does inside its transaction: an HTTP call, say


async def culprit_and_victims(dsn: str) -> None:
    async def culprit() -> None:
        conn = await asyncpg.connect(
            dsn, statement_cache_size=0, server_settings={"application_name": "checkout"}
        )
        try:
            for _ in range(3):
                async with conn.transaction():
                    await conn.execute("update hog set n = n + 1 where id = 1")
                    await asyncio.sleep(HOLD_S)  # non-database work while holding the server
        finally:
            await conn.close()

    async def victim() -> None:
        conn = await asyncpg.connect(dsn, statement_cache_size=0, server_settings={"application_name": "api"})
        try:
            for i in range(10):
                assert await conn.fetchval("select $1::int", i) == i
        finally:
            await conn.close()

    await asyncio.wait_for(asyncio.gather(culprit(), culprit(), *(victim() for _ in range(6))), 60)


async def test_metrics_and_advice_name_the_culprit(
    start_pooler: Any, postgres: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pypooler")
    postgres.psql(
        "drop table if exists hog; create table hog (id int primary key, n int);"
        " insert into hog values (1, 0)"
    )
    pooler = start_pooler(pool_size=2, hold_warn_ms=200, wait_warn_ms=100, stats_period=3600)
    before = scrape(pooler.metrics_url)
    await culprit_and_victims(pooler.dsn())
    after = scrape(pooler.metrics_url)

    labels = {"database": "pypooler_test", "user": "postgres"}
    hold = after["pypooler_hold_seconds"]
    xacts = after["pypooler_transactions"]
    for app, expected in (("checkout", 6), ("api", 60)):
        app_labels = {**labels, "application_name": app}
        count = sample(xacts, "pypooler_transactions_total", **app_labels)
        assert count == expected
        # Histogram counts equal transaction counts.
        assert sample(hold, "pypooler_hold_seconds_count", **app_labels) == count
        assert (
            sample(
                after["pypooler_checkout_wait_seconds"], "pypooler_checkout_wait_seconds_count", **app_labels
            )
            == count
        )
        assert (
            sample(
                after["pypooler_idle_in_transaction_seconds"],
                "pypooler_idle_in_transaction_seconds_count",
                **app_labels,
            )
            == count
        )
    checkout = {**labels, "application_name": "checkout"}
    api = {**labels, "application_name": "api"}
    # Every culprit hold is at least the sleep; most of it idle in transaction.
    assert sample(hold, "pypooler_hold_seconds_bucket", le="0.25", **checkout) == 0
    assert sample(hold, "pypooler_hold_seconds_sum", **checkout) >= 6 * HOLD_S
    idle_sum = sample(
        after["pypooler_idle_in_transaction_seconds"], "pypooler_idle_in_transaction_seconds_sum", **checkout
    )
    assert 6 * HOLD_S * 0.9 <= idle_sum <= sample(hold, "pypooler_hold_seconds_sum", **checkout)
    # The victims were short but had to wait.
    assert sample(hold, "pypooler_hold_seconds_bucket", le="0.1", **api) == 60
    wait = after["pypooler_checkout_wait_seconds"]
    assert sample(wait, "pypooler_checkout_wait_seconds_bucket", le="0.05", **api) < 60
    assert sample(wait, "pypooler_checkout_wait_seconds_sum", **api) > HOLD_S
    # Counters only go up.
    for name, samples in before.items():
        if name.endswith("_total") or name in ("pypooler_transactions",):
            for s in samples:
                if s.name.endswith("_total"):
                    assert sample(after[name], s.name, **s.labels) >= s.value

    # The advisor does the arithmetic and names the culprit.
    (advice,) = pooler.call_async(
        advisor.advise(pooler.pooler.manager, pooler.settings, pooler.pooler.activity)
    )
    assert advice.hold_p99_ms >= HOLD_S * 1000 * 0.9
    assert advice.idle_share >= advisor.IDLE_SHARE_CULPRIT
    assert advice.top_idle_application == "checkout"
    assert advice.server_limits is not None and advice.server_limits.max_connections == 20
    assert (advice.verdict.category, advice.verdict.culprit) == ("idle_in_transaction", "app=checkout")
    assert "application_name=checkout" in advice.verdict.text
    assert any(note.startswith("clients wait") for note in advice.notes)

    # Hog detection logged the holder, and a waiter was told who held the servers.
    messages = [r.getMessage() for r in caplog.records]
    assert any("held a server idle in transaction" in m and "app=checkout" in m for m in messages)
    assert any("for a server" in m and "top holders" in m and "app=checkout" in m for m in messages)


async def test_idle_transaction_timeout(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, idle_transaction_timeout=0.3)
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    await conn.execute("begin")
    pid = await conn.fetchval("select pg_backend_pid()")
    await asyncio.sleep(1.2)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await conn.fetchval("select 1")
    await conn.close(timeout=2)
    other = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await other.fetchval("select pg_backend_pid()") != pid  # that server was closed
    finally:
        await other.close()
    assert pooler.pool().stats.errors["idle_transaction_timeout"] == 1


async def test_idle_transaction_timeout_fires_on_time_with_default_settings(start_pooler: Any) -> None:
    """idle_transaction_timeout = 1 s, everything else at its default: each client is ended
    within 1.5 s of going idle in its transaction, whenever it went idle. Before the pass's
    interval counted idle_transaction_timeout it was 1 s here, so the timeout fired 1 to 2 s
    after going idle, depending on where in the pass's cycle the client went idle; three
    clients 0.35 s apart cover that cycle, so one of them was always late."""
    pooler = start_pooler(pool_size=3, idle_transaction_timeout=1)

    async def idle_in_transaction(delay: float) -> float:
        await asyncio.sleep(delay)
        conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
        try:
            await conn.execute("begin")
            await conn.fetchval("select 1")
            idle_from = asyncio.get_running_loop().time()
            while not conn.is_closed():
                await asyncio.sleep(0.01)
                if asyncio.get_running_loop().time() - idle_from > 5:
                    break
            return asyncio.get_running_loop().time() - idle_from
        finally:
            await conn.close(timeout=2)

    lasted = await asyncio.gather(*(idle_in_transaction(delay) for delay in (0, 0.35, 0.7)))
    assert all(0.9 <= seconds < 1.5 for seconds in lasted), lasted
    assert pooler.pool().stats.errors["idle_transaction_timeout"] == 3


async def test_health_endpoints(start_pooler: Any) -> None:
    pooler = start_pooler()
    for path, status in (("/healthz", 200), ("/readyz", 200)):
        with urllib.request.urlopen(pooler.metrics_url + path, timeout=5) as response:
            assert response.status == status
