"""Tests for pypooler.accepting: the descriptor budget rule, the open files limit, and an
Acceptor that runs out of descriptors (a fake accept)."""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
from typing import Any

import pytest

from pypooler.accepting import (
    FIXED_MARGIN,
    Acceptor,
    check_descriptor_budget,
    descriptors_needed,
    raise_descriptor_limit,
    server_bound,
)
from pypooler.config import load_settings
from pypooler.log_limits import LogLimiter


def test_the_budget_is_clients_plus_pool_bounds_plus_listeners_plus_margin() -> None:
    settings = load_settings(
        None, env={}, max_client_conn=500, default_pool_size=20,
        databases={"app": {"pool_size": 10, "user": "app"}, "*": {}},
    )  # fmt: skip
    assert server_bound(settings) == (10 + 1) + (20 + 1)
    assert descriptors_needed(settings) == 500 + 32 + FIXED_MARGIN


def test_the_budget_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(None, env={}, max_client_conn=1000, databases={"app": {"pool_size": 5}})
    assert check_descriptor_budget(settings, limit=100_000) is None
    with caplog.at_level("WARNING", logger="pypooler.accepting"):
        line = check_descriptor_budget(settings, limit=256)
    assert line is not None and "open files limit 256" in line and "max_client_conn 1000" in line
    assert any("open files limit 256" in r.getMessage() for r in caplog.records)


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        pytest.skip("no room between the soft and hard limits here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))
    assert raise_descriptor_limit() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


class OutOfDescriptors:
    """A listening socket whose accept() fails with EMFILE."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.family = real.family
        self.accepts = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> Any:
        self.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self.real.close()


async def test_an_accept_out_of_descriptors_is_counted_and_pauses_until_resumed() -> None:
    real = socket.create_server(("127.0.0.1", 0))
    real.setblocking(False)
    listening = OutOfDescriptors(real)
    failures: list[OSError] = []
    acceptor = Acceptor(
        [listening],  # type: ignore[list-item]
        asyncio.Protocol,
        log_limiter=LogLimiter(lines=2),
        on_failure=failures.append,
    )
    await acceptor.start()
    client = socket.create_connection(real.getsockname())
    try:
        for _ in range(50):
            await asyncio.sleep(0.01)
            if failures:
                break
        await asyncio.sleep(0.05)
        assert len(failures) == 1 and acceptor.paused  # paused: no busy loop on EMFILE
        assert listening.accepts == 1
        acceptor.resume()  # what the maintenance pass does
        await asyncio.sleep(0.05)
        assert len(failures) == 2 and acceptor.paused
    finally:
        client.close()
        acceptor.close()
