"""First contact: the basic client matrix through pypooler."""

from __future__ import annotations

import asyncpg


async def test_asyncpg_simple_query(start_pooler) -> None:  # type: ignore[no-untyped-def]
    pooler = start_pooler(pool_size=2)
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await conn.fetchval("select 40 + 2") == 42
        async with conn.transaction():
            await conn.execute("create temp table t (x int) on commit drop")
            await conn.execute("insert into t values (1)")
    finally:
        await conn.close()
