"""Bounded pools: a pool made for an unconfigured user or database goes away when unused
(autodb_idle_timeout), and at most max_auto_pools of them exist (53400 past it); a scan of
3,000 user names leaves pools and memory at their bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import codec
from tests.support.pgwire import RawClient
from tests.support.poolers import RunningPooler
from tests.support.processes import PoolerFactory, connect
from tests.support.prometheus import scrape


def pool_keys(pooler: RunningPooler) -> set[tuple[str, str]]:
    return pooler.call(lambda: set(pooler.pooler.manager.pools))


def metric_pools(pooler: Any) -> set[tuple[str, str]]:
    samples = scrape(pooler.metrics_url)["pypooler_pool_size"]
    return {(s.labels["database"], s.labels["user"]) for s in samples}


async def test_pools_of_unknown_users_are_removed_when_unused(
    start_pooler: Callable[..., Any],
) -> None:
    pooler = start_pooler(autodb_idle_timeout=0.3)
    for n in range(5):  # trust auth: any user name logs in; the server then refuses it
        with pytest.raises(asyncpg.PostgresError):
            await asyncpg.connect(pooler.dsn(user=f"ghost_{n}"))
    conn = await asyncpg.connect(pooler.dsn())
    try:
        assert {("pypooler_test", f"ghost_{n}") for n in range(5)} <= pool_keys(pooler)
        assert ("pypooler_test", "ghost_0") in metric_pools(pooler)
        deadline = time.monotonic() + 10
        while len(pool_keys(pooler)) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        # The pool in use stays; the others left the console and /metrics.
        assert pool_keys(pooler) == {("pypooler_test", "postgres")}
        assert metric_pools(pooler) == {("pypooler_test", "postgres")}
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_max_auto_pools_refuses_one_more_until_one_is_unused(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    target = {"host": postgres.host, "port": postgres.port}
    pooler = start_pooler(
        max_auto_pools=2, autodb_idle_timeout=0,
        databases={"pypooler_test": target, "postgres": target, "*": target},
    )  # fmt: skip
    first = await asyncpg.connect(pooler.dsn(dbname="pypooler_test"))
    second = await asyncpg.connect(pooler.dsn(dbname="postgres"))
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            await asyncpg.connect(pooler.dsn(dbname="template1"))
        assert refused.value.sqlstate == "53400"
        assert "max_auto_pools (2)" in str(refused.value)
        await second.close()
        # An unused pool makes room at once, even with autodb_idle_timeout off.
        third = await asyncpg.connect(pooler.dsn(dbname="template1"))
        assert await third.fetchval("select current_database()") == "template1"
        await third.close()
        assert pool_keys(pooler) == {("pypooler_test", "postgres"), ("template1", "postgres")}
    finally:
        await first.close()


async def test_many_unknown_user_names_leave_no_pool_behind(start_pooler: Callable[..., Any]) -> None:
    # The seed's incident in small: a scanner trying user names under trust auth. Each login
    # makes a pool (the server then refuses the role); the reap takes them all back.
    pooler = start_pooler(autodb_idle_timeout=0.5, max_auto_pools=100)
    names = [f"scan_{n}" for n in range(300)]

    async def try_login(name: str) -> None:
        client = await RawClient.connect(pooler.host, pooler.port)
        try:
            client.send(codec.build_startup_message({"user": name, "database": "pypooler_test"}))
            await client.until_ready()
        finally:
            await client.close()

    for start in range(0, len(names), 50):  # 50 at a time, bounded
        await asyncio.wait_for(asyncio.gather(*(try_login(n) for n in names[start : start + 50])), 60)
        assert len(pool_keys(pooler)) <= 100  # max_auto_pools holds under the scan
    deadline = time.monotonic() + 10
    while pool_keys(pooler) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert pool_keys(pooler) == set()
    assert pooler.call(lambda: pooler.pooler.manager.auto_pools) == 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pool_series(metrics_url: str) -> int:
    return len(scrape(metrics_url)["pypooler_pool_size"])


async def test_a_scan_of_3000_user_names_returns_pools_and_memory_to_their_bound(
    tmp_path: Path, postgres: EmbeddedPostgres
) -> None:
    # The scan, in a pooler process of its own so its memory can be read: 3,000 unknown
    # user names under trust auth (the server refuses each role), in three rounds of 1,000.
    factory = PoolerFactory(tmp_path, postgres)
    try:
        process, config, dsn, metrics_url = factory(autodb_idle_timeout=0.5)
        port = int(config.read_text().split("listen_port = ")[1].split()[0])
        pid = process.proc.pid

        async def try_login(name: str) -> None:
            client = await RawClient.connect("127.0.0.1", port)
            try:
                client.send(codec.build_startup_message({"user": name, "database": "pypooler_test"}))
                await client.until_ready()
            finally:
                await client.close()

        with connect(dsn) as conn:  # warmed up: a login served, its pool made
            conn.execute("select 1")
        before = rss_kib(pid)
        after: list[int] = []
        for scan in range(3):
            names = [f"scan{scan}_{n}" for n in range(1000)]
            for start in range(0, len(names), 50):  # 50 at a time, bounded
                batch = names[start : start + 50]
                await asyncio.wait_for(asyncio.gather(*(try_login(name) for name in batch)), 60)
            deadline = time.monotonic() + 15
            while pool_series(metrics_url) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert pool_series(metrics_url) == 0  # every pool made for the scan is gone
            after.append(rss_kib(pid))
        # Before the reap existed: 3,002 pools and +40 MB for 3,000 names, growing with every name
        # ever tried (13 KiB each). Now what a round leaves is handed back after its reap
        # (release_memory): RSS stays within a bound (the allocator's high-water mark of one
        # round, 6-28 MiB here depending on the build) instead of growing with each round.
        assert max(after) - before < 32 * 1024, (before, after)
        assert max(after[1:]) - after[0] < 12 * 1024, (before, after)
    finally:
        for started in factory.started:
            started.stop()
