"""Pool states the admin console sets: PAUSE, RECONNECT, RELOAD's new bound, with fake servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pypooler.pool import PoolManager
from pypooler.server import ServerLogin
from tests.unit.test_pool import (
    FakeClient,
    FakeConnector,
    FakeServer,
    add_idle,
    assert_bounded,
    checkout,
    connector,
    make_pool,
    make_settings,
    release,
)
from tests.unit.test_pool import pytestmark as pytestmark  # skipped under a compiled pool

__all__ = ["connector"]  # the fixture, imported to be found by pytest


@pytest.fixture(autouse=True)
def close_needed_on_fake_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # ServerConnection.close_needed; the shared fake predates it.
    monkeypatch.setattr(FakeServer, "close_needed", False, raising=False)
    yield


async def test_pause_closes_idle_queues_checkouts_and_closes_released_servers(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=2)
    lent, idle = add_idle(pool, 2)
    holder = FakeClient("holder")
    assert checkout(pool, holder) is idle  # LIFO: the last released one
    pool.pause()
    assert lent.closed and pool.idle == [] and not pool.drained

    waiter = FakeClient("waiter")
    assert checkout(pool, waiter) is None
    assert waiter.waiting and connector.calls == 0  # queued; nothing opened while paused
    release(pool, idle)
    assert idle.closed and waiter.linked == [] and pool.drained
    assert_bounded(pool)

    pool.resume()
    (server,) = await connector.succeed()
    assert waiter.linked == [server] and not pool.draining


async def test_reconnect_closes_idle_now_and_lent_servers_when_released(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=2)
    lent, idle = add_idle(pool, 2)
    holder = FakeClient("holder")
    assert checkout(pool, holder) is idle
    pool.reconnect()
    assert lent.closed and not idle.closed and pool.close_pending

    waiter = FakeClient("waiter")
    assert checkout(pool, waiter) is None  # a replacement for the closed idle one is opened
    (fresh,) = await connector.succeed()
    assert waiter.linked == [fresh] and not fresh.close_needed
    release(pool, idle)
    assert idle.closed and not pool.close_pending and not pool.draining
    release(pool, fresh)
    assert pool.idle == [fresh]  # new servers are lent as usual
    assert_bounded(pool)


async def test_reconfigure_shrinks_idle_first_and_grows_for_waiters(connector: FakeConnector) -> None:
    pool = make_pool(size=3)
    cold, warm, hot = add_idle(pool, 3)
    settings = make_settings()
    pool.reconfigure(pool.login, size=1, mode="session", settings=settings)
    assert (cold.closed, warm.closed, hot.closed) == (True, True, False)
    assert (pool.size, pool.mode, pool.settings) == (1, "session", settings)

    a, b = FakeClient("a"), FakeClient("b")
    assert checkout(pool, a) is hot
    assert checkout(pool, b) is None and connector.calls == 0  # at the bound
    pool.reconfigure(pool.login, size=2, mode="session", settings=settings)
    (server,) = await connector.succeed()
    assert b.linked == [server]


async def test_reconfigure_with_a_new_address_replaces_every_server(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    idle, lent = add_idle(pool, 2)
    holder = FakeClient()
    assert checkout(pool, holder) is lent
    moved = ServerLogin("10.0.0.9", 5432, "app", "alice", None)
    pool.reconfigure(moved, size=2, mode="transaction", settings=pool.settings)
    assert pool.login is moved and idle.closed and lent.close_needed
    release(pool, lent)
    assert lent.closed and pool.servers == set()


async def test_manager_pauses_pools_created_later_and_resumes_by_database() -> None:
    settings = make_settings(databases={"app": {}, "other": {}})
    manager = PoolManager(settings)
    manager.pause("app")
    app = manager.get_pool("app", "alice")
    other = manager.get_pool("other", "alice")
    assert app is not None and other is not None
    assert app.paused and not other.paused
    manager.pause(None)
    manager.resume("app")  # everything is still paused
    assert app.paused and other.paused
    manager.resume(None)
    assert not app.paused and not other.paused and not manager.paused_databases
