"""One `POST /sql` request as a client of its pool (sql_over_http.py runs it).

A request is a client for as long as it is in a pool: from its login to its response. It is in
`Pool.http_clients` for that time, so it shows where a TCP client shows: SHOW CLIENTS and SHOW
POOLS (state waiting or active, transport `http`), the holders that SHOW HOLDERS, the hog lines
and the advisor look at (`Pool.holders`), and the histograms of its application_name (checkout
wait and hold, counted when its server goes back). It is a `Waiter` and a `Holder` (pool.py), so
the maintenance pass's timeouts reach it as they reach a TCP client: `fail` ends a wait with the
error (query_wait_timeout), or interrupts the request holding a server (query_timeout), whose
server is then closed and its backend cancelled by the release rule (`Pool.give_back`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pypooler.protocol.errors import PoolerError

if TYPE_CHECKING:
    from pypooler.http_types import HttpRequest
    from pypooler.pool import Pool
    from pypooler.server import ServerConnection
    from pypooler.stats import TrafficStats


class StatementNote:
    """The statement a holder last sent, as the holders view reads it (`last_statement`)."""

    __slots__ = ("last_statement",)

    def __init__(self) -> None:
        self.last_statement = b""


class HttpClient:
    """A request in a pool (see the module docstring)."""

    transport_name = "http"

    def __init__(self, request: HttpRequest, pool: Pool, user: str, application_name: str) -> None:
        self.pool = pool
        self.user = user
        self.database = pool.database
        self.application_name = application_name
        self.peer = request.peer
        self.transport = request.transport  # for SHOW CLIENTS' addresses
        self.traffic: TrafficStats = pool.stats.for_application(application_name)
        self.connected_ns = request.connected_ns
        self.started_ns = time.monotonic_ns()  # http_request_timeout counts from here
        self.task = request.task
        self.future: asyncio.Future[ServerConnection] | None = None  # made only if it waits
        self.failure: PoolerError | None = None
        # Waiter
        self.waiting = False
        self.wait_started_ns = 0
        self.waited_ns = 0
        # Holder: a request runs from its lend to its last answer, never idle in between.
        self.server: ServerConnection | None = None
        self.lent_ns = 0
        self.query_start_ns = 0
        self.idle_since_ns = 0
        self.idle_in_xact = False
        self.idle_ns = 0
        self.hog_warned = False
        self.frontend = StatementNote()
        self.closed = False

    # ------------------------------------------------------------------ in and out of the pool

    def __enter__(self) -> HttpClient:
        self.pool.http_clients[self] = None
        return self

    def __exit__(self, *_: object) -> None:
        self.closed = True
        self.pool.http_clients.pop(self, None)
        if self.waiting:
            self.pool.cancel_wait(self)

    async def borrow(self, statement: bytes) -> ServerConnection:
        """A server for this request, waiting in line like a client."""
        self.frontend.last_statement = statement
        pool = self.pool
        server = pool.checkout(self)
        if server is None:  # queued: `link` or `fail` answers this, never before the await
            self.future = asyncio.get_running_loop().create_future()
            server = await self.future
        now = time.monotonic_ns()
        if self.wait_started_ns:
            self.waited_ns = now - self.wait_started_ns
        self.server = server
        self.lent_ns = self.query_start_ns = now
        return server

    def returned(self, batch: bool) -> None:
        """The server went back (or was closed): count the hold as a TCP client's is counted."""
        now = time.monotonic_ns()
        held = now - self.lent_ns
        traffic = self.traffic
        if batch:  # BEGIN + statements, then COMMIT: two requests in one hold
            traffic.hold_multi.observe(held)
            traffic.query_multi.observe(held)
        else:
            traffic.single.observe(held)
        if self.waited_ns:
            traffic.wait_nonzero.observe(self.waited_ns)
        self.pool.stats.account_transaction(self.frontend.last_statement, held, 0)
        self.server = None

    # ------------------------------------------------------------------ Waiter and Holder

    def link(self, server: ServerConnection) -> None:
        future = self.future
        if future is None or future.done() or self.closed:  # gave up in the meantime
            self.pool.release(server)
        else:
            future.set_result(server)

    def fail(self, exc: PoolerError) -> None:
        """A timeout of the maintenance pass: end the wait, or interrupt the request."""
        if self.failure is not None or self.closed:
            return
        self.failure = exc
        self.traffic.errors[exc.reason] += 1
        if self.server is None:
            future = self.future
            if future is not None and not future.done():
                future.set_exception(exc)
        elif self.task is not None:
            self.task.cancel()
