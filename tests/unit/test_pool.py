"""Tests for pypooler.pool accounting, with fake server and client connections (no sockets).

`pypooler.pool.open_server_connection` is replaced by `FakeConnector`, which hands out one
pending connect per call; a test completes each one (with a server or an error) when it wants,
so every state of "connecting" can be observed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast, overload

import pytest

from pypooler import pool as pool_module
from pypooler.config import Settings, load_settings
from pypooler.maintenance import maintain_pool
from pypooler.pool import Pool
from pypooler.protocol.errors import PoolerError, QueryWaitTimeout, ServerConnectFailed, ShuttingDown
from pypooler.protocol.transaction import FrontendStream
from pypooler.server import ServerConnection, ServerLogin

if TYPE_CHECKING:
    from pypooler.client import ClientConnection

NS = 1_000_000_000

# The fakes are duck-typed: a mypyc-compiled pool rejects them (it checks argument types) and
# calls open_server_connection directly (the monkeypatch does not reach it). Under a compiled
# build these tests run in a second pass with PYPOOLER_PURE=1.
pytestmark = pytest.mark.skipif(
    not pool_module.__file__ or not pool_module.__file__.endswith(".py"),
    reason="needs pypooler.pool as Python source (PYPOOLER_PURE=1)",
)


def default_login() -> ServerLogin:
    return ServerLogin("127.0.0.1", 5432, "app", "alice", None)


class FakeServer:
    """What the pool uses of a ServerConnection."""

    count = 0

    def __init__(self, *, age_s: float = 0.0, login: ServerLogin | None = None) -> None:
        FakeServer.count += 1
        self.login = login or default_login()
        self.name = f"s{FakeServer.count}"
        self.closed = False
        self.lost = False
        self.ends_later = False
        self.process_id = 0
        self.closing_ns = 0
        self.cancelled_ns = 0
        self.transport: Any = None
        self.close_needed = False
        self.created_ns = time.monotonic_ns() - int(age_s * NS)
        self.last_used_ns = 0
        self.checked_ns = 0
        self.on_close: Any = None
        self.parameters = {"server_version": "16.2", "client_encoding": "UTF8"}
        self.client: FakeClient | None = None
        self.cancels = 0
        self.release_after_cancel = False
        self.statements: Any = None
        self.backend: Any = None

    def parameter_status(self, name: str, value: str) -> None:
        self.parameters = {**self.parameters, name: value}

    def close(self) -> None:
        # Like ServerConnection.close: idempotent, tells the owner once. Its backend ends at
        # once unless `ends_later` (then `end` is PostgreSQL closing the connection).
        if self.closed:
            return
        self.closed = True
        self.lost = not self.ends_later
        self._notify()

    def end(self) -> None:
        """PostgreSQL closed the connection (connection_lost)."""
        self.closed = self.lost = True
        self._notify()

    def _notify(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self)

    def __repr__(self) -> str:
        return self.name


class EndingTransport:
    """A closed server's transport whose abort is PostgreSQL's connection ending at once."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.server.end()


class FakeClient:
    """What the pool uses of a ClientConnection."""

    def __init__(self, name: str = "c") -> None:
        self.name = name
        self.waiting = False
        self.wait_started_ns = 0
        self.linked: list[FakeServer] = []
        self.failures: list[PoolerError] = []
        # What log lines about holders and waiters read.
        self.peer = f"127.0.0.1:{name}"
        self.application_name = name
        self.lent_ns = 0
        self.idle_since_ns = 0
        self.idle_in_xact = False
        self.hog_warned = False
        self.frontend = FrontendStream()
        # What a RELOAD that changes pool_mode reads and sets.
        self.mode = "transaction"
        self.rewriter: object | None = object()

    @property
    def server(self) -> FakeServer | None:
        return self.linked[-1] if self.linked else None

    def link(self, server: ServerConnection) -> None:
        fake = as_fake(server)
        assert not self.waiting, "linked while still marked waiting"
        assert fake.client is None, f"{fake} lent to {fake.client} and {self}"
        fake.client = self
        self.linked.append(fake)

    def fail(self, exc: PoolerError) -> None:
        assert not self.waiting, "failed while still marked waiting"
        self.failures.append(exc)

    def __repr__(self) -> str:
        return self.name


# The pool is typed for the real connections, classes a fake cannot be (mypyc compiles them);
# run from the sources it takes anything with what it uses, as these fakes have. Fakes cross into
# the pool's types, and back, only through these casts.


def as_server(fake: FakeServer) -> ServerConnection:
    return cast(ServerConnection, fake)


def as_fake(server: ServerConnection) -> FakeServer:
    """A server the pool holds: each one came from FakeConnector or a test's as_server."""
    return cast(FakeServer, server)


@overload
def fakes(servers: list[ServerConnection]) -> list[FakeServer]: ...
@overload
def fakes(servers: set[ServerConnection]) -> set[FakeServer]: ...
def fakes(servers: list[ServerConnection] | set[ServerConnection]) -> list[FakeServer] | set[FakeServer]:
    """One of the pool's own lists or sets (not a copy), as the fakes it holds."""
    return cast("list[FakeServer] | set[FakeServer]", servers)


def as_client(fake: FakeClient) -> ClientConnection:
    return cast("ClientConnection", fake)


class FakeConnector:
    """Stands in for open_server_connection; each call waits until the test completes it."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[FakeServer]] = []
        self.logins: list[ServerLogin] = []  # what each pending connect was asked to log in as
        self.calls = 0

    async def __call__(self, login: ServerLogin, timeout: float) -> FakeServer:
        self.calls += 1
        self.logins.append(login)
        future: asyncio.Future[FakeServer] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return await future

    async def succeed(self, count: int = 1, **server_args: Any) -> list[FakeServer]:
        await settle()
        servers = []
        for _ in range(count):
            server = FakeServer(login=self.logins.pop(0), **server_args)
            self.pending.pop(0).set_result(server)
            servers.append(server)
        await settle()
        return servers

    async def fail(self, exc: PoolerError) -> None:
        await settle()
        self.logins.pop(0)
        self.pending.pop(0).set_exception(exc)
        await settle()


async def settle() -> None:
    """Let the pool's connect tasks run to their next await."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def connector(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeConnector]:
    fake = FakeConnector()
    monkeypatch.setattr(pool_module, "open_server_connection", fake)
    yield fake
    for future in fake.pending:  # connects a test left pending end as cancelled tasks
        future.cancel()
    await settle()


def make_settings(**overrides: Any) -> Settings:
    # No server_check_query: these fake servers answer no query (the check has its own test).
    return load_settings(None, env={}, **{"server_check_query": "", **overrides})


def make_pool(size: int = 2, **overrides: Any) -> Pool:
    settings = make_settings(**overrides)
    return Pool("app", "alice", default_login(), size=size, mode="transaction", settings=settings)


def add_idle(pool: Pool, count: int) -> list[FakeServer]:
    """Servers logged in earlier and now idle, oldest release first."""
    servers = []
    for _ in range(count):
        server = FakeServer()
        pool.servers.add(as_server(server))
        server.on_close = pool.server_closed
        pool.release(as_server(server))
        servers.append(server)
    return servers


def checkout(pool: Pool, client: FakeClient) -> FakeServer | None:
    """pool.checkout, noting who holds a server lent at once (a queued client gets `link`)."""
    server = pool.checkout(client)
    if server is None:
        return None
    client.link(server)
    return as_fake(server)


def release(pool: Pool, server: FakeServer) -> None:
    server.client = None
    pool.release(as_server(server))


def assert_bounded(pool: Pool) -> None:
    assert len(pool.servers) + pool.connecting <= pool.size
    assert pool.waiting == sum(1 for client in pool.waiters if client.waiting)
    assert pool.waiting >= 0 and pool.connecting >= 0
    assert set(pool.idle) <= pool.servers
    assert not (pool.idle and pool.waiting), "a server idles while a client waits"


# --------------------------------------------------------------------------- lending


async def test_idle_servers_are_reused_lifo(connector: FakeConnector) -> None:
    pool = make_pool(size=3)
    s1, s2, s3 = add_idle(pool, 3)

    assert checkout(pool, FakeClient()) is s3
    assert checkout(pool, FakeClient()) is s2
    release(pool, s3)
    assert checkout(pool, FakeClient()) is s3  # the most recently used, not the coldest
    assert checkout(pool, FakeClient()) is s1
    assert pool.lent == 3
    assert connector.calls == 0


async def test_a_closed_idle_server_leaves_the_idle_list_at_once(connector: FakeConnector) -> None:
    # checkout takes the top of `idle` without looking: closing (or losing) a server tells the
    # pool synchronously, so a closed server is never there to be taken.
    pool = make_pool(size=3)
    s1, s2 = add_idle(pool, 2)
    s2.close()

    assert fakes(pool.idle) == [s1]
    assert checkout(pool, FakeClient()) is s1
    assert pool.idle == []


async def test_checkout_opens_a_server_and_links_the_waiter(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    client = FakeClient()

    assert checkout(pool, client) is None

    assert client.waiting
    assert (pool.waiting, pool.connecting) == (1, 1)  # counted before its task even starts
    await settle()
    assert (connector.calls, pool.connecting) == (1, 1)
    (server,) = await connector.succeed()
    assert client.linked == [server]
    assert not client.waiting
    assert (pool.waiting, pool.connecting, pool.lent) == (0, 0, 1)
    assert pool.servers == {server}
    assert server.on_close == pool.server_closed
    assert pool.parameters == server.parameters
    assert pool.stats.server_connects == 1
    assert pool.stats.server_connect.count == 1 and pool.stats.server_connect.sum_ns > 0


async def test_never_more_than_size_servers(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    clients = [FakeClient(f"c{i}") for i in range(5)]
    for client in clients:
        assert checkout(pool, client) is None
        assert_bounded(pool)
    await settle()

    assert connector.calls == 2
    assert pool.connecting == 2
    s1, s2 = await connector.succeed(2)
    assert_bounded(pool)
    assert [c.linked for c in clients] == [[s1], [s2], [], [], []]  # FIFO
    assert pool.waiting == 3
    assert connector.calls == 2  # no room for more

    release(pool, s2)
    release(pool, s1)
    assert [c.linked for c in clients[2:]] == [[s2], [s1], []]  # handed over, FIFO
    assert pool.idle == []
    assert_bounded(pool)


async def test_release_hands_over_to_the_first_client_still_waiting(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    holder = FakeClient("holder")
    assert checkout(pool, holder) is server
    a, b, c, d = (FakeClient(name) for name in "abcd")
    for client in (a, b, c, d):
        checkout(pool, client)
    await settle()
    assert connector.calls == 0  # the pool is full

    pool.cancel_wait(a)
    pool.cancel_wait(a)  # a second cancel changes nothing
    pool.cancel_wait(c)
    assert pool.waiting == 2

    release(pool, server)
    assert b.linked == [server]
    assert a.linked == c.linked == []
    assert pool.waiting == 1
    assert list(pool.waiters) == [c, d]

    release(pool, server)
    assert d.linked == [server]
    assert not pool.waiters
    assert pool.waiting == 0

    release(pool, server)
    assert fakes(pool.idle) == [server]
    assert a.failures == c.failures == []


async def test_next_idle_is_the_server_checkout_lends(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    assert pool.next_idle is None
    _, s2 = add_idle(pool, 2)

    top = pool.next_idle

    assert top is s2  # LIFO: the last one released
    assert checkout(pool, FakeClient()) is top
    assert pool.next_idle is not top


async def test_give_back_releases_what_the_rule_passed_and_closes_the_rest(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=2)
    clean, dirty = add_idle(pool, 2)
    checkout(pool, FakeClient())
    checkout(pool, FakeClient())
    waiter = FakeClient()
    checkout(pool, waiter)

    dirty.client = None
    pool.give_back(as_server(dirty), False)
    assert dirty.closed and waiter.linked == []
    clean.client = None
    pool.give_back(as_server(clean), True)

    assert waiter.linked == [clean] and not clean.closed


async def test_a_cancel_in_flight_defers_the_release_until_it_is_delivered(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    checkout(pool, FakeClient())
    waiter = FakeClient()
    checkout(pool, waiter)
    pool.cancel_started(as_server(server))
    pool.cancel_started(as_server(server))

    release(pool, server)
    assert waiter.linked == [] and server.release_after_cancel
    pool.cancel_delivered(as_server(server))
    assert waiter.linked == []  # one cancel is still on its way
    pool.cancel_delivered(as_server(server))

    assert waiter.linked == [server] and not server.release_after_cancel


async def test_a_cancel_delivered_without_a_release_changes_nothing(connector: FakeConnector) -> None:
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    checkout(pool, FakeClient())
    pool.cancel_started(as_server(server))

    pool.cancel_delivered(as_server(server))

    assert server.cancels == 0 and pool.idle == [] and server.client is not None


async def test_release_goes_idle_when_every_waiter_left(connector: FakeConnector) -> None:
    pool = make_pool(size=1)
    client = FakeClient()
    checkout(pool, client)
    pool.cancel_wait(client)
    (server,) = await connector.succeed()

    assert client.linked == []
    assert fakes(pool.idle) == [server]
    assert not pool.waiters


async def test_release_of_a_closed_server_is_ignored(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    s1, s2 = add_idle(pool, 2)
    checkout(pool, FakeClient())
    s2.close()

    release(pool, s2)

    assert fakes(pool.idle) == [s1]
    assert fakes(pool.servers) == {s1}


async def test_server_closed_while_lent_is_replaced_for_waiters(connector: FakeConnector) -> None:
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    checkout(pool, FakeClient())
    waiter = FakeClient()
    checkout(pool, waiter)
    await settle()
    assert connector.calls == 0

    server.close()  # the backend died under its client
    await settle()

    assert pool.servers == set()
    assert connector.calls == 1
    (replacement,) = await connector.succeed()
    assert waiter.linked == [replacement]


# --------------------------------------------------------------------------- connect failures


async def test_connect_failure_with_no_servers_fails_every_waiter(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    clients = [FakeClient(f"c{i}") for i in range(3)]
    for client in clients:
        checkout(pool, client)
    pool.cancel_wait(clients[1])
    await settle()
    first = ServerConnectFailed("could not connect to server: connection refused")
    second = ServerConnectFailed("could not connect to server: timed out")

    await connector.fail(first)
    assert [c.failures for c in clients] == [[], [], []]  # another connect is still under way
    assert pool.last_connect_error is first

    await connector.fail(second)
    assert clients[0].failures == [second]
    assert clients[1].failures == []  # it had left already
    assert clients[2].failures == [second]
    assert not any(c.waiting for c in clients)
    assert (pool.waiting, pool.connecting, len(pool.waiters)) == (0, 0, 0)
    assert pool.last_connect_error is second
    assert pool.stats.server_connects == 0


async def test_connect_failure_while_servers_exist_keeps_waiters(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    (server,) = add_idle(pool, 1)
    checkout(pool, FakeClient())
    waiter = FakeClient()
    checkout(pool, waiter)

    await connector.fail(ServerConnectFailed("refused"))

    assert waiter.waiting
    assert waiter.failures == []
    release(pool, server)
    assert waiter.linked == [server]


async def test_server_login_retry_keeps_waiters_and_tries_again(connector: FakeConnector) -> None:
    pool = make_pool(size=2, server_login_retry=0.05)
    client = FakeClient()
    checkout(pool, client)

    await connector.fail(ServerConnectFailed("refused"))
    assert client.waiting
    assert client.failures == []
    late = FakeClient("late")
    checkout(pool, late)  # within the retry delay: no new connect yet
    await settle()
    assert connector.calls == 1

    maintain_pool(pool, time.monotonic_ns())  # the pass: within the delay, nothing yet
    await settle()
    assert connector.calls == 1
    maintain_pool(pool, time.monotonic_ns() + NS)  # the pass after the delay retries
    await settle()
    assert connector.calls == 3  # one per waiter, after the delay
    s1, s2 = await connector.succeed(2)
    assert (client.linked, late.linked) == ([s1], [s2])


async def test_connect_success_clears_last_error(connector: FakeConnector) -> None:
    pool = make_pool(size=1)
    checkout(pool, FakeClient())
    await connector.fail(ServerConnectFailed("refused"))
    assert pool.last_connect_error is not None

    client = FakeClient()
    checkout(pool, client)
    (server,) = await connector.succeed()

    assert pool.last_connect_error is None
    assert client.linked == [server]


async def test_ensure_parameters_opens_one_server(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    task = asyncio.get_running_loop().create_task(pool.ensure_parameters())
    (server,) = await connector.succeed()

    assert await task == server.parameters
    assert fakes(pool.idle) == [server]
    assert await pool.ensure_parameters() == server.parameters
    assert connector.calls == 1


async def test_concurrent_ensure_parameters_share_one_connect(connector: FakeConnector) -> None:
    pool = make_pool(size=5)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pool.ensure_parameters()) for _ in range(4)]
    (server,) = await connector.succeed()

    assert [await task for task in tasks] == [server.parameters] * 4
    assert connector.calls == 1


async def test_ensure_parameters_reports_the_connect_error(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    task = asyncio.get_running_loop().create_task(pool.ensure_parameters())
    refused = ServerConnectFailed("refused")
    await connector.fail(refused)

    with pytest.raises(ServerConnectFailed) as excinfo:
        await task
    assert excinfo.value is refused
    assert pool.connecting == 0


# --------------------------------------------------------------------------- expiry


async def test_query_wait_timeout_fails_only_expired_waiters(connector: FakeConnector) -> None:
    pool = make_pool(size=1, query_wait_timeout=10)
    (server,) = add_idle(pool, 1)
    checkout(pool, FakeClient("holder"))
    t0 = time.monotonic_ns()
    left, a, b, c = (FakeClient(name) for name in ("left", "a", "b", "c"))
    for client, started in ((left, t0 - NS), (a, t0), (b, t0 + 5 * NS), (c, t0 + 9 * NS)):
        checkout(pool, client)
        client.wait_started_ns = started  # as if each had queued at `started`
    pool.cancel_wait(left)

    maintain_pool(pool, t0 + 10 * NS - 1)
    assert [x.failures for x in (left, a, b, c)] == [[], [], [], []]

    maintain_pool(pool, t0 + 10 * NS)
    assert left.failures == []
    assert len(a.failures) == 1
    timeout = a.failures[0]
    assert isinstance(timeout, QueryWaitTimeout)
    assert timeout.sqlstate == "08006"
    assert "query_wait_timeout" in timeout.message
    assert (b.failures, c.failures) == ([], [])
    assert (b.waiting, c.waiting) == (True, True)
    assert pool.waiting == 2

    maintain_pool(pool, t0 + 15 * NS)
    assert len(b.failures) == 1
    assert c.waiting
    assert pool.waiting == 1

    release(pool, server)
    assert c.linked == [server]
    assert (a.linked, b.linked) == ([], [])


async def test_query_wait_timeout_zero_waits_forever(connector: FakeConnector) -> None:
    pool = make_pool(size=1, query_wait_timeout=0)
    add_idle(pool, 1)
    checkout(pool, FakeClient("holder"))
    client = FakeClient()
    checkout(pool, client)

    maintain_pool(pool, time.monotonic_ns() + 10**6 * NS)

    assert client.waiting
    assert client.failures == []


async def test_server_idle_timeout_closes_the_longest_idle(connector: FakeConnector) -> None:
    pool = make_pool(size=3, server_idle_timeout=60)
    s1, s2, s3 = add_idle(pool, 3)
    t0 = time.monotonic_ns()
    s1.last_used_ns, s2.last_used_ns, s3.last_used_ns = t0, t0 + 30 * NS, t0 + 50 * NS

    maintain_pool(pool, t0 + 60 * NS - 1)
    assert fakes(pool.idle) == [s1, s2, s3]

    maintain_pool(pool, t0 + 60 * NS)
    assert (s1.closed, s2.closed, s3.closed) == (True, False, False)
    assert fakes(pool.idle) == [s2, s3]
    assert fakes(pool.servers) == {s2, s3}

    maintain_pool(pool, t0 + 100 * NS)
    assert fakes(pool.idle) == [s3]
    assert fakes(pool.servers) == {s3}
    assert connector.calls == 0  # nobody waits: nothing to replace


async def test_idle_timeout_spares_lent_servers(connector: FakeConnector) -> None:
    pool = make_pool(size=2, server_idle_timeout=60)
    s1, s2 = add_idle(pool, 2)
    assert checkout(pool, FakeClient()) is s2

    maintain_pool(pool, time.monotonic_ns() + 3600 * NS)

    assert s1.closed
    assert not s2.closed
    assert fakes(pool.servers) == {s2}


async def test_server_lifetime_closes_at_release(connector: FakeConnector) -> None:
    pool = make_pool(size=2, server_lifetime=100)
    young, old = FakeServer(age_s=10), FakeServer(age_s=200)
    for server in (young, old):
        pool.servers.add(as_server(server))
        server.on_close = pool.server_closed

    maintain_pool(pool, time.monotonic_ns())  # the maintenance pass marks the old one; both are lent
    assert not old.closed and pool.draining
    release(pool, young)
    release(pool, old)

    assert not young.closed
    assert old.closed
    assert pool.idle == [young]
    assert pool.servers == {young}


async def test_server_lifetime_expiry_with_a_waiter_opens_a_replacement(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=1, server_lifetime=100)
    old = FakeServer(age_s=200)
    pool.servers.add(as_server(old))
    old.on_close = pool.server_closed
    waiter = FakeClient()
    checkout(pool, waiter)
    await settle()
    assert connector.calls == 0

    maintain_pool(pool, time.monotonic_ns())
    release(pool, old)
    assert old.closed
    assert waiter.linked == []
    (fresh,) = await connector.succeed()

    assert waiter.linked == [fresh]


async def test_server_lifetime_zero_keeps_servers(connector: FakeConnector) -> None:
    pool = make_pool(size=1, server_lifetime=0)
    old = FakeServer(age_s=10**6)
    pool.servers.add(as_server(old))

    maintain_pool(pool, time.monotonic_ns())
    release(pool, old)

    assert fakes(pool.idle) == [old]
    assert not old.closed


async def test_server_lifetime_closes_idle_servers_in_the_maintenance_pass(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=2, server_lifetime=100)
    young, old = FakeServer(age_s=10), FakeServer(age_s=200)
    for server in (young, old):
        pool.servers.add(as_server(server))
        server.on_close = pool.server_closed
        release(pool, server)

    maintain_pool(pool, time.monotonic_ns())

    assert old.closed and not young.closed
    assert fakes(pool.idle) == [young]
    assert not pool.draining  # nothing left to close


# --------------------------------------------------------------------------- stats, shutdown


async def test_release_hands_over_without_counting_itself(connector: FakeConnector) -> None:
    # Waits and holds are counted by the client (it knows its application_name), not the pool.
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    assert checkout(pool, FakeClient()) is server

    waiter = FakeClient()
    checkout(pool, waiter)
    release(pool, server)

    assert waiter.linked == [server]
    assert pool.stats.xact_count == 0
    assert not pool.stats.apps


async def test_a_closed_server_keeps_its_place_until_its_backend_has_ended(connector: FakeConnector) -> None:
    # pool_size bounds backends: a server closed under a client that left mid-query (its
    # backend still running) counts until PostgreSQL closes the connection.
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    server.ends_later = True
    leaving, waiting = FakeClient(), FakeClient()
    assert checkout(pool, leaving) is server
    assert checkout(pool, waiting) is None

    server.client = None
    pool.give_back(as_server(server), False)
    await settle()

    assert server.closed and fakes(pool.ending) == {server} and pool.servers == set()
    assert pool.occupied == 1 and connector.calls == 0  # no second backend while the first runs
    server.end()
    await settle()
    assert pool.ending == set() and connector.calls == 1
    (replacement,) = await connector.succeed()
    assert waiting.linked == [replacement]


async def test_a_backend_that_does_not_end_is_given_up_by_the_maintenance_pass(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    server.ends_later = True
    server.transport = EndingTransport(server)
    server.close()
    server.closing_ns = time.monotonic_ns() - 60 * NS  # closed a minute ago; still not ended

    maintain_pool(pool, time.monotonic_ns())

    assert server.transport.aborted and pool.ending == set() and pool.occupied == 0


async def test_close_fails_waiters_and_closes_servers(connector: FakeConnector) -> None:
    pool = make_pool(size=2)
    s1, s2 = add_idle(pool, 2)
    checkout(pool, FakeClient())
    checkout(pool, FakeClient())
    waiter = FakeClient()
    checkout(pool, waiter)

    pool.close()

    assert s1.closed and s2.closed
    assert pool.servers == set()
    assert len(waiter.failures) == 1
    assert isinstance(waiter.failures[0], ShuttingDown)
    assert pool.waiting == 0
    with pytest.raises(ShuttingDown):
        checkout(pool, FakeClient())


async def test_server_opened_after_close_is_closed(connector: FakeConnector) -> None:
    pool = make_pool(size=1)
    checkout(pool, FakeClient())
    await settle()
    pool.close()

    (server,) = await connector.succeed()

    assert server.closed
    assert pool.servers == set()


# --------------------------------------------------------------------------- reload and drain


async def test_reconfigure_to_a_bigger_pool_serves_waiters_at_once(connector: FakeConnector) -> None:
    pool = make_pool(size=1)
    add_idle(pool, 1)
    checkout(pool, FakeClient())
    waiter = FakeClient()
    checkout(pool, waiter)
    assert connector.calls == 0  # the pool is full: the waiter queues

    pool.reconfigure(default_login(), size=2, mode="transaction", settings=make_settings())
    (s2,) = await connector.succeed()

    assert waiter.server is s2
    assert_bounded(pool)


async def test_reconfigure_to_a_smaller_pool_closes_idle_now_and_lent_at_release(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=3)
    s1, s2, s3 = add_idle(pool, 3)
    assert checkout(pool, FakeClient()) is s3
    assert checkout(pool, FakeClient()) is s2

    pool.reconfigure(default_login(), size=1, mode="transaction", settings=make_settings())

    assert s1.closed and not s2.closed and not s3.closed  # lent servers finish their transactions
    release(pool, s3)
    release(pool, s2)
    # One more than the new size is closed instead of idling; the other stays.
    assert [server.closed for server in (s2, s3)].count(True) == 1
    assert len(pool.servers) == 1 and pool.idle == list(pool.servers)
    assert not pool.draining
    assert_bounded(pool)


async def test_reconfigure_to_a_new_server_retires_old_servers_without_cutting_transactions(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=2)
    old_idle, old_lent = add_idle(pool, 2)
    client = FakeClient()
    assert checkout(pool, client) is old_lent
    new_login = ServerLogin("10.0.0.9", 5433, "app", "alice", "secret")

    pool.reconfigure(new_login, size=2, mode="transaction", settings=make_settings())

    assert old_idle.closed and not old_lent.closed  # the transaction goes on
    release(pool, old_lent)
    assert old_lent.closed
    checkout(pool, FakeClient())
    (fresh,) = await connector.succeed()
    assert fresh.login is new_login
    release(pool, fresh)
    assert not fresh.closed and pool.idle == [fresh] and not pool.draining


async def test_reconfigure_across_session_mode_keeps_session_clients_in_session_mode(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=2)
    pool.mode = "session"
    pool.rewriting = False
    session_client = FakeClient("plain")
    session_client.mode = "session"
    session_client.rewriter = None
    rewriting_client = FakeClient("rewriting")
    rewriting_client.mode = "session"  # it logged in under transaction mode, then followed a RELOAD
    pool.clients.update(dict.fromkeys((as_client(session_client), as_client(rewriting_client))))

    pool.reconfigure(default_login(), size=2, mode="statement", settings=make_settings())

    assert pool.rewriting
    assert session_client.mode == "session"
    assert rewriting_client.mode == "statement"


async def test_refitting_a_server_gives_back_its_statement_references(connector: FakeConnector) -> None:
    pool = make_pool(size=1)
    (server,) = add_idle(pool, 1)
    pool.fit_stream(as_server(server), rewriting=True)
    statement = pool.statements.acquire(b"SELECT 1\0\0\0")
    server.statements.add(statement, 1)
    pool.statements.release(statement)  # the client that prepared it left
    assert len(pool.statements) == 1

    pool.fit_stream(as_server(server), rewriting=False)

    assert server.statements is None and len(pool.statements) == 0


async def test_drain_refuses_new_transactions_and_lets_lent_servers_finish(
    connector: FakeConnector,
) -> None:
    pool = make_pool(size=2)
    idle, lent = add_idle(pool, 2)
    holder = FakeClient()
    assert checkout(pool, holder) is lent
    checkout(pool, FakeClient())  # takes `idle`
    waiter = FakeClient()
    checkout(pool, waiter)

    pool.drain()

    assert [type(e) for e in waiter.failures] == [ShuttingDown] and pool.waiting == 0
    assert not lent.closed and not idle.closed  # both still inside their transactions
    with pytest.raises(ShuttingDown):
        checkout(pool, FakeClient())
    release(pool, lent)
    assert lent.closed  # a drained pool keeps nothing idle
    assert connector.calls == 0


# --------------------------------------------------------------------------- random operations


async def test_random_operations_keep_the_books(connector: FakeConnector) -> None:
    """Random checkouts, cancels, releases, deaths, connects and expiries never break the bounds."""
    for seed in range(40):
        rng = random.Random(seed)
        pool = make_pool(size=rng.randint(1, 4), query_wait_timeout=5, server_idle_timeout=5)
        clients: list[FakeClient] = []
        now = time.monotonic_ns()
        for _ in range(120):
            op = rng.randrange(7)
            holders = [c for c in clients if c.server is not None and c.server.client is c]
            waiting = [c for c in clients if c.waiting]
            if op == 0:
                client = FakeClient(f"c{len(clients)}")
                clients.append(client)
                checkout(pool, client)
            elif op == 1 and waiting:
                pool.cancel_wait(rng.choice(waiting))
            elif op == 2 and holders:
                server = rng.choice(holders).server
                assert server is not None
                release(pool, server)
            elif op == 3 and holders:
                server = rng.choice(holders).server
                assert server is not None
                server.client = None
                server.close()
            elif op == 4 and connector.pending:
                if rng.random() < 0.8:
                    await connector.succeed()
                else:
                    await connector.fail(ServerConnectFailed("refused"))
            elif op == 5:
                now += rng.randint(0, 3) * NS
                maintain_pool(pool, now)
            else:
                await settle()
            assert_bounded(pool)
            lent = [c.server for c in clients if c.server is not None and c.server.client is c]
            assert len(lent) == len(set(map(id, lent)))
            assert pool.lent == sum(1 for s in lent if not s.closed)
        pool.close()
        for future in connector.pending:
            future.cancel()
        connector.pending.clear()
        await settle()
