"""What every client connection shares: `ClientRegistry` (settings, pools, the live clients,
cancel requests) and `ClientTable`, the live clients in numbered slots.

A client's BackendKeyData is its cancel key: the process id is its slot in the table under
random bits, the secret 32 random bits, as PostgreSQL's own, so a CancelRequest finds its client
with one list index, and nobody can cancel someone else's query without guessing 38 bits.
`send_cancel` delivers a cancel to the server the client holds, with that server's own key.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pypooler.auth import Authenticator, ClientAuthExchange
from pypooler.config import Settings
from pypooler.pool import Pool, PoolManager
from pypooler.protocol import codec
from pypooler.protocol.errors import TooManyClients
from pypooler.protocol.login import ClientLogin
from pypooler.server import ServerConnection
from pypooler.tls import ClientTls

if TYPE_CHECKING:
    from pypooler.client import ClientConnection

log = logging.getLogger("pypooler.client")

# A client's BackendKeyData: the process id is its slot in ClientTable (the low SLOT_BITS) under
# random bits, the secret key 32 random bits, as PostgreSQL's own. Kept as one int (cancel_key_of)
# under 2**62, which the compiled build stores in the object itself.
CANCEL_RANDOM = struct.Struct("!iI")  # a secret key, and random bits for the process id
CANCEL_KEYS_PER_BATCH = 256
# Admin console sessions allowed beyond max_client_conn (as PostgreSQL keeps
# superuser_reserved_connections); accepting.py's FIXED_MARGIN has room for them.
CONSOLE_RESERVE = 10
SLOT_BITS = 24  # 16 million clients, far beyond any descriptor limit
_SLOT_MASK = (1 << SLOT_BITS) - 1
_PID_RANDOM_MASK = (1 << (30 - SLOT_BITS)) - 1
AdminLogin = Callable[["ClientConnection", codec.StartupMessage, bytes], None]


class ClientRegistry:
    """What every client connection shares: settings, pools, live clients and their cancel keys.

    The hooks are set by app.Pooler, so this module never imports the admin console or the app:
    `admin_login(client, startup, early_bytes)` takes over a client that asked for database
    pgbouncer/pypooler; `reload()` re-reads the configuration (raising ConfigError, the old one
    staying in force); `shutdown()` stops the pooler.
    """

    def __init__(
        self,
        settings: Settings,
        manager: PoolManager,
        *,
        auth: Authenticator | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.auth = auth if auth is not None else Authenticator(settings)
        self.tls = tls
        # Live client connections, admin console sessions and WebSocket clients included (they
        # count against max_client_conn, see `check_room`).
        self.clients = ClientTable()
        # Open HTTP connections not turned into WebSocket clients (http_listener.py): each holds
        # a socket, so each counts against max_client_conn too.
        self.http_connections = 0
        # Clients not logged in yet, oldest first (dicts keep insertion order: the maintenance
        # pass, client_login_timeout, stops at the first one still within its time), with their
        # login machines (protocol/login.py): a logged-in client keeps no field for one.
        self.logging_in: dict[ClientConnection, ClientLogin[ClientAuthExchange]] = {}
        self._random_keys: list[tuple[int, int]] = []
        self.errors: Counter[str] = Counter()  # errors before a pool was chosen, by reason
        # Every log line a client can cause again and again goes through this (log_limits.py).
        self.log_limiter = manager.log_limiter
        self.connects = 0  # TCP connections accepted
        # accept() calls that failed for want of file descriptors (accepting.py).
        self.accept_failures = 0
        # Cancel requests being delivered -> when they started (monotonic ns): the maintenance
        # pass abandons those still in flight after CANCEL_TIMEOUT_S.
        self.cancels: dict[asyncio.Task[None], int] = {}
        self.accepting = True
        self.admin_login: AdminLogin | None = None
        # (application_name, kind) pairs already warned about (session_state_policy = "log").
        self.warned: set[tuple[str, str]] = set()
        self.reload: Callable[[], None] | None = None
        self.shutdown: Callable[[], None] | None = None

    @property
    def client_count(self) -> int:
        """What max_client_conn bounds: client connections of every transport."""
        return len(self.clients) + self.http_connections

    def check_room(self, *, console: bool = False) -> None:
        """max_client_conn, checked at a login (the one logging in already counted): raise
        TooManyClients past it. The console has CONSOLE_RESERVE places beyond it, so the
        operator who comes to see why the pooler is full is let in."""
        limit = self.settings.max_client_conn
        if self.client_count > limit + (CONSOLE_RESERVE if console else 0):
            raise TooManyClients(
                "no more connections allowed (max_client_conn)", detail=f"max_client_conn is {limit}"
            )

    def new_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        """A fresh BackendKeyData for a client: unguessable (the secret and the process id's top
        bits are random), so nobody cancels others; the process id finds the client's slot."""
        if not self._random_keys:
            # One getrandom() call per CANCEL_KEYS_PER_BATCH logins, not one per login.
            self._random_keys = list(
                CANCEL_RANDOM.iter_unpack(secrets.token_bytes(CANCEL_RANDOM.size * CANCEL_KEYS_PER_BATCH))
            )
        secret, bits = self._random_keys.pop()
        process_id = ((bits & _PID_RANDOM_MASK) << SLOT_BITS) | (client.cancel_key >> 32)
        client.cancel_key = cancel_key_of(process_id, secret)
        return process_id, secret

    def cancel(self, process_id: int, secret_key: int) -> None:
        """Forward a CancelRequest to the server the client is linked to right now, if any.

        A client that is not linked has nothing running; sending anything would risk cancelling
        another client's query on a server it no longer holds. A server with a cancel in flight
        is not lent to anyone else until the postmaster has taken it (see Pool.release), so a
        transaction that ends meanwhile cannot pass the cancel on to the next borrower.
        """
        client = self.clients.at(process_id & _SLOT_MASK)
        if client is None or client.cancel_key != cancel_key_of(process_id, secret_key):
            return
        server = client.server  # None before the welcome (no key was given out yet)
        if server is None:
            return
        client.pool.cancel_started(server)
        task = asyncio.get_running_loop().create_task(send_cancel(client, server, client.pool))
        self.cancels[task] = time.monotonic_ns()
        task.add_done_callback(self._cancel_done)

    def _cancel_done(self, task: asyncio.Task[None]) -> None:
        self.cancels.pop(task, None)

    def cancel_timed_out(self, task: asyncio.Task[None], timeout: float) -> None:
        """The maintenance pass gave up on a cancel request: stop delivering it (send_cancel's
        cleanup lets its server be lent again)."""
        self.log_limiter.log(
            log, logging.WARNING, ("cancel_failed", "timeout"),
            "cancel request not delivered within %g s: abandoned", timeout,
        )  # fmt: skip
        task.cancel()


class ClientTable:
    """The live client connections (admin console sessions included), each in a numbered slot
    that is also the low bits of its BackendKeyData process id (ClientRegistry.new_cancel_key).

    A list with a free list, where a set of clients and a dict of cancel keys cost about 110
    bytes per idle client. Reads like a set: `len`, iteration (over a copy), `in`.
    """

    __slots__ = ("_count", "_free", "_slots")

    def __init__(self) -> None:
        self._slots: list[ClientConnection | None] = [None]  # slot 0 is no client's
        self._free: list[int] = []
        self._count = 0

    def add(self, client: ClientConnection) -> None:
        free = self._free
        if free:
            slot = free.pop()
            self._slots[slot] = client
        else:
            slot = len(self._slots)
            self._slots.append(client)
        client.cancel_key = cancel_key_of(slot, 0)
        self._count += 1

    def discard(self, client: ClientConnection) -> None:
        slot = (client.cancel_key >> 32) & _SLOT_MASK
        if slot and self._slots[slot] is client:
            self._slots[slot] = None
            self._free.append(slot)
            self._count -= 1
            client.cancel_key = 0

    def at(self, slot: int) -> ClientConnection | None:
        slots = self._slots
        return slots[slot] if 0 < slot < len(slots) else None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[ClientConnection]:
        return iter([client for client in self._slots if client is not None])

    def __contains__(self, client: object) -> bool:
        key = getattr(client, "cancel_key", None)
        return isinstance(key, int) and self.at((key >> 32) & _SLOT_MASK) is client


def cancel_key_of(process_id: int, secret_key: int) -> int:
    """The one int a BackendKeyData (both signed Int32 on the wire) is kept as."""
    return (process_id << 32) | (secret_key & 0xFFFFFFFF)


async def send_cancel(client: ClientConnection, server: ServerConnection, pool: Pool) -> None:
    """Deliver `client`'s cancel to `server` with the server's own key; then let the pool lend
    the server again if it was released meanwhile."""
    host, port = server.address  # the host it is connected to (one of several, hosts.py)
    # No timeout here: the maintenance pass cancels this task after CANCEL_TIMEOUT_S.
    try:
        await server.cancel_backend(still_wanted=lambda: client.server is server)
    except OSError as exc:
        client.registry.log_limiter.log(
            log, logging.WARNING, ("cancel_failed", host, port),
            "cancel request to %s:%d failed: %s", host, port, exc,
        )  # fmt: skip
    finally:
        pool.cancel_delivered(server)
