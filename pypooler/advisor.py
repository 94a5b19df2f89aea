"""The Little's-law advisor: turns pool stats into sizing verdicts (work in progress)."""

from __future__ import annotations

from pypooler.config import Settings
from pypooler.pool import PoolManager

ADVICE_COLUMNS = ["database", "user", "verdict"]


async def advice_table(
    manager: PoolManager, settings: Settings
) -> tuple[list[str], list[list[str | None]]]:
    """SHOW ADVICE: columns and rows (text)."""
    return ADVICE_COLUMNS, [[p.database, p.user, "ok"] for p in manager.pools.values()]
