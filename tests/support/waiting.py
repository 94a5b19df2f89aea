"""Waiting for a condition that becomes true a moment later (a pooler sees a client leave, a
process comes up): polled until a deadline, then a failed assertion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(check: Callable[[], Any], timeout: float = 5, interval: float = 0.02) -> None:
    """Poll `check` (it may return an awaitable) on the running loop until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(interval)


def wait_until(
    check: Callable[[], bool], timeout: float = 20, interval: float = 0.1, what: str = "timed out"
) -> None:
    """Poll `check`, blocking, until it is true; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(interval)
