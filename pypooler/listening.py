"""Real LISTEN in transaction and statement mode: one listener connection per pool.

In transaction mode a client's `LISTEN` would register whichever server it happened to borrow, and
the next borrower would get the notifications. With `listen_mode = "multiplex"` (the default)
pypooler answers `LISTEN ch`, `UNLISTEN ch` and `UNLISTEN *` itself, as PostgreSQL would
(CommandComplete "LISTEN"/"UNLISTEN", ReadyForQuery with the client's transaction status), and a
`Listener` per pool holds the LISTENs of all its clients on one server connection of its own:

- A channel is LISTENed on the listener connection when its first client listens, and UNLISTENed
  when its last client leaves (UNLISTEN, UNLISTEN *, DISCARD ALL, disconnection). A thousand
  listeners on one channel, or on a hundred, cost that one server.
- Each NotificationResponse the listener connection receives is passed, as the very bytes
  PostgreSQL sent (the notifying backend's pid, channel, payload), to every client listening on
  its channel: at once when the client holds no server, else queued (at most
  `MAX_QUEUED_NOTIFICATIONS`, the oldest dropped with a rate-limited warning) and written after
  the ReadyForQuery that ends its transaction, as PostgreSQL delivers between transactions.
- A client's LISTEN is answered once the listener connection has confirmed the LISTEN (its
  ReadyForQuery), so a NOTIFY sent after the client's LISTEN returned always reaches it. An
  UNLISTEN is answered at once: delivery looks the channel up in the map, so nothing more comes.
- The listener connection is opened like the pool's other servers (same login, TLS and timeout)
  but is not one of them: it is never lent, and it is not counted in `pool_size`. A pool with
  listeners uses at most pool_size + 1 server connections. It is opened at the first LISTEN and
  closed when no channel has been listened to for `server_idle_timeout` (or at once without it).
- If it dies, it is reopened with exponential backoff (`RECONNECT_*`, with jitter) and every
  channel is LISTENed again; clients keep their registrations. Notifications sent while it was
  down are lost (the log says so). A client's LISTEN that cannot be confirmed because no
  connection can be opened gets the connection error (SQLSTATE 08001) and is not registered.
- Inside a transaction block a LISTEN or UNLISTEN is answered at once and takes effect at the
  block's end if it committed (the CommandComplete "COMMIT" just before the ReadyForQuery 'I'),
  and not at all if it rolled back, as in PostgreSQL; the COMMIT's answer waits for the new
  LISTENs to be confirmed. In a failed block it is refused with 25P02, as PostgreSQL refuses
  every statement there.

What is intercepted (`protocol/listen.py`, `listen_request`), when the client has no request
outstanding and the read holds nothing else: a simple Query of one LISTEN/UNLISTEN statement;
an extended batch of the unnamed statement (Parse, Bind, Describe, Execute, Sync); the Bind,
Execute, Sync of a named statement that is one LISTEN/UNLISTEN (asyncpg's `add_listener`
prepares it with Parse, Describe, Flush first: the server holding that unsynced batch is given
back with a Sync of pypooler's). Anything else holding LISTEN (several statements in one Query,
a pipeline) goes to the server as before and is handled by `session_state_policy`; UNLISTENs
among other statements (asyncpg's pool reset: `...; UNLISTEN *; RESET ALL;`) are also applied
to the client's channels. A LISTEN from a client holding no server needs none: it is answered
without a checkout, even when the pool is exhausted.

Who calls what: the rewriting stream spots LISTEN/UNLISTEN with the session-state scan it runs
anyway (the hot path's quick check lets no "lis"/"unl" text through), `ClientConnection` answers
and registers (`_answer_listen`), and writes or queues what `Listener` delivers (`notify`). The
channel name is kept as the client's bytes: its client_encoding must be the server encoding for
non-ASCII names to match.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import PoolerError, ServerConnectFailed, ShuttingDown
from pypooler.protocol.listen import notification_channel, quote_channel
from pypooler.server import ServerConnection, open_server_connection
from pypooler.stats import NS_PER_S

if TYPE_CHECKING:
    from pypooler.pool import Pool

log = logging.getLogger("pypooler.listening")

# NotificationResponses queued per client while it holds a server; beyond, the oldest go.
MAX_QUEUED_NOTIFICATIONS: Final = 1024
DROP_WARNING_INTERVAL_NS: Final = 10 * NS_PER_S  # at most one "dropped" warning per pool this often
RECONNECT_FIRST_S: Final = 0.1  # the first retry after the listener connection is lost
RECONNECT_MAX_S: Final = 10.0  # the backoff doubles up to this
_Q: Final = c.F_QUERY
# What a LISTEN still waiting for the listener connection gets at shutdown (57P01: admin_shutdown).
_SHUTTING_DOWN: Final = ShuttingDown("pypooler is shutting down").to_error_response("ERROR")


# --------------------------------------------------------------------------- the map


class Subscriber(Protocol):
    """What a listening client offers the listener (ClientConnection)."""

    def notify(self, message: bytes) -> None: ...


class ChannelMap:
    """Which subscribers listen on which channel, both ways (pure bookkeeping).

    `listen` says whether the channel is new (the listener connection must LISTEN), `unlisten`
    and `unlisten_all` which channels have no subscriber left (it must UNLISTEN them).
    """

    __slots__ = ("by_channel", "by_subscriber")

    def __init__(self) -> None:
        self.by_channel: dict[bytes, set[Subscriber]] = {}
        self.by_subscriber: dict[Subscriber, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self.by_channel)

    def listen(self, subscriber: Subscriber, channel: bytes) -> bool:
        subscribers = self.by_channel.get(channel)
        new = subscribers is None
        if subscribers is None:
            subscribers = self.by_channel[channel] = set()
        subscribers.add(subscriber)
        self.by_subscriber.setdefault(subscriber, set()).add(channel)
        return new

    def unlisten(self, subscriber: Subscriber, channel: bytes) -> bool:
        channels = self.by_subscriber.get(subscriber)
        if channels is None or channel not in channels:
            return False
        channels.discard(channel)
        if not channels:
            del self.by_subscriber[subscriber]
        subscribers = self.by_channel[channel]
        subscribers.discard(subscriber)
        if subscribers:
            return False
        del self.by_channel[channel]
        return True

    def unlisten_all(self, subscriber: Subscriber) -> list[bytes]:
        channels = self.by_subscriber.get(subscriber)
        if not channels:
            return []
        return [channel for channel in list(channels) if self.unlisten(subscriber, channel)]

    def subscribers(self, channel: bytes) -> set[Subscriber]:
        return self.by_channel.get(channel) or set()

    def channels_of(self, subscriber: Subscriber) -> set[bytes]:
        return self.by_subscriber.get(subscriber) or set()


# --------------------------------------------------------------------------- the listener


# Called with b"" when a LISTEN took effect, else with an ErrorResponse: then the client is still
# registered, and the callback decides (a client waiting for its answer unregisters).
Confirm = Callable[[bytes], None]


class Listener:
    """One pool's listener connection and its channel map; see the module docstring.

    Commands on the connection are simple Queries answered in order: `_sent` holds, per Query
    sent, its channel, whether it LISTENed, and the confirmations waiting for it, so each
    ReadyForQuery settles the oldest. `_on_server` is what the connection has been asked to
    listen to; `_in_flight` maps a channel to the confirmations of its latest unanswered LISTEN;
    `_waiting` holds confirmations while no connection is open.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.map = ChannelMap()
        self.server: ServerConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._sent: deque[tuple[bytes, bool, list[Confirm]]] = deque()
        self._on_server: set[bytes] = set()
        self._in_flight: dict[bytes, list[Confirm]] = {}
        self._waiting: dict[bytes, list[Confirm]] = {}
        self._error: bytes = b""  # the ErrorResponse of the command in flight, if any
        self._backoff = 0.0
        # No channel since then (0: some channel, or nothing open); maintenance.py closes the
        # connection server_idle_timeout after it.
        self.empty_since_ns = 0
        self.closed = False
        self.delivered = 0  # NotificationResponses passed to clients
        self.dropped = 0  # dropped from full client queues
        self.reconnects = 0
        self._last_drop_warning_ns = 0

    @property
    def unused(self) -> bool:
        """No channel, no connection open or being opened: its pool may be removed."""
        return self.server is None and self._connecting is None and not len(self.map)

    # ------------------------------------------------------------------ clients

    def listen(self, client: Subscriber, channel: bytes, confirm: Confirm) -> None:
        """Register `client` on `channel`; `confirm` is called once the listener connection
        listens on it (at once when it already does)."""
        if self.closed:
            confirm(_SHUTTING_DOWN)
            return
        self.map.listen(client, channel)
        self.empty_since_ns = 0
        server = self.server
        if server is None:
            self._waiting.setdefault(channel, []).append(confirm)
            self._ensure_connecting()
        elif channel not in self._on_server:
            self._send(server, channel, listen=True, confirms=[confirm])
        else:
            in_flight = self._in_flight.get(channel)
            if in_flight is not None:
                in_flight.append(confirm)
            else:
                confirm(b"")

    def unlisten(self, client: Subscriber, channel: bytes) -> None:
        if self.map.unlisten(client, channel):
            self._channel_left(channel)

    def unlisten_all(self, client: Subscriber) -> None:
        for channel in self.map.unlisten_all(client):
            self._channel_left(channel)

    def channels_of(self, client: Subscriber) -> set[bytes]:
        return self.map.channels_of(client)

    def _channel_left(self, channel: bytes) -> None:
        server = self.server
        if server is not None and channel in self._on_server:
            self._send(server, channel, listen=False)
        if not self.map:
            self.empty_since_ns = time.monotonic_ns()
            if not self.pool.settings.server_idle_timeout:
                self._close_server()

    # ------------------------------------------------------------------ the connection

    def _send(
        self, server: ServerConnection, channel: bytes, *, listen: bool, confirms: list[Confirm] | None = None
    ) -> None:
        if listen:
            self._on_server.add(channel)
            waiting = confirms if confirms is not None else []
            self._in_flight[channel] = waiting
            self._sent.append((channel, True, waiting))
            server.transport.write(codec.build_message(_Q, b"LISTEN " + quote_channel(channel) + b"\0"))
        else:
            self._on_server.discard(channel)
            self._in_flight.pop(channel, None)
            self._sent.append((channel, False, []))
            server.transport.write(codec.build_message(_Q, b"UNLISTEN " + quote_channel(channel) + b"\0"))

    def _ensure_connecting(self) -> None:
        if self._connecting is None and not self.closed:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
            self.pool.track_task(self._connecting)

    async def _connect(self) -> None:
        try:
            while not self.closed and self.map:
                if self._backoff:
                    # Jitter: pools that lost their listeners together do not return together.
                    await asyncio.sleep(self._backoff * (0.5 + random.random() / 2))
                pool = self.pool
                try:
                    server = await open_server_connection(pool.login, pool.settings.server_connect_timeout)
                except PoolerError as exc:
                    self._backoff = min(RECONNECT_MAX_S, max(RECONNECT_FIRST_S, self._backoff * 2))
                    log.warning(
                        "pool %s/%s: listener connection failed: %s (retrying in up to %.1f s)",
                        pool.database,
                        pool.user,
                        exc.message,
                        self._backoff,
                    )
                    self._fail_waiting(exc)
                    continue
                if self.closed or not self.map:
                    server.close()
                    return
                self._backoff = 0.0
                self._opened(server)
                return
        finally:
            self._connecting = None

    def _opened(self, server: ServerConnection) -> None:
        self.server = server
        self._sent.clear()
        self._on_server.clear()
        self._in_flight.clear()
        self._error = b""

        def on_message(msg_type: int, body: bytes) -> bool:
            return self._on_message(server, msg_type, body)

        server.deliver_to(on_message)
        pool = self.pool
        count = len(self.map)
        log.info(
            "pool %s/%s: listener connection open (server pid %d), %d channel%s",
            pool.database,
            pool.user,
            server.process_id,
            count,
            "" if count == 1 else "s",
        )
        waiting, self._waiting = self._waiting, {}
        for channel in list(self.map.by_channel):
            self._send(server, channel, listen=True, confirms=waiting.pop(channel, None))
        for confirms in waiting.values():  # channels left meanwhile: nothing to wait for
            for confirm in confirms:
                confirm(b"")

    def _on_message(self, server: ServerConnection, msg_type: int, body: bytes) -> bool:
        if server is not self.server:  # a connection closed or replaced
            return msg_type == 0
        if msg_type == c.B_NOTIFICATION_RESPONSE:
            self._deliver(codec.build_message(msg_type, body), notification_channel(body))
        elif msg_type == c.B_READY_FOR_QUERY:
            if self._sent:
                channel, listened, confirms = self._sent.popleft()
                error, self._error = self._error, b""
                if listened:
                    self._listened(channel, confirms, error)
        elif msg_type == c.B_ERROR_RESPONSE:
            fields = codec.parse_error_fields(body)
            log.warning(
                "pool %s/%s: listener connection: %s %s",
                self.pool.database,
                self.pool.user,
                fields.get("C"),
                fields.get("M"),
            )
            if self._sent:
                self._error = codec.build_message(msg_type, body)
        elif msg_type == 0:  # the connection is gone
            self._lost()
            return True
        return False

    def _listened(self, channel: bytes, confirms: list[Confirm], error: bytes) -> None:
        if self._in_flight.get(channel) is confirms:
            del self._in_flight[channel]
        if error:
            self._on_server.discard(channel)
        for confirm in confirms:
            confirm(error)

    def _deliver(self, message: bytes, channel: bytes) -> None:
        subscribers = self.map.by_channel.get(channel)
        if not subscribers:
            return
        self.delivered += len(subscribers)
        for client in list(subscribers):
            client.notify(message)

    def note_dropped(self, client_peer: str) -> None:
        """A client's queue was full and its oldest notification dropped (rate-limited log)."""
        self.dropped += 1
        now = time.monotonic_ns()
        if now - self._last_drop_warning_ns >= DROP_WARNING_INTERVAL_NS:
            self._last_drop_warning_ns = now
            log.warning(
                "pool %s/%s: client %s holds a server while %d notifications wait for it: the oldest"
                " are dropped (%d dropped so far in this pool)",
                self.pool.database,
                self.pool.user,
                client_peer,
                MAX_QUEUED_NOTIFICATIONS,
                self.dropped,
            )

    def _lost(self) -> None:
        self._close_server()
        if self.closed or not self.map:
            return
        pool = self.pool
        count = len(self.map)
        log.warning(
            "pool %s/%s: listener connection lost; reopening it and listening again on %d channel%s"
            " (notifications sent meanwhile are lost)",
            pool.database,
            pool.user,
            count,
            "" if count == 1 else "s",
        )
        self.reconnects += 1
        self._backoff = RECONNECT_FIRST_S
        self._ensure_connecting()

    def _fail_waiting(self, exc: PoolerError) -> None:
        """No connection could be opened: LISTENs waiting for one fail with its error."""
        waiting, self._waiting = self._waiting, {}
        error = ServerConnectFailed(
            f"pypooler could not open its listener connection: {exc.message}", hint=exc.hint
        )
        response = error.to_error_response("ERROR")
        for confirms in waiting.values():
            for confirm in confirms:
                confirm(response)

    def _close_server(self) -> None:
        server = self.server
        if server is not None:
            self.server = None
            for channel, listened, confirms in self._sent:  # asked again on the next connection
                if listened and confirms:
                    self._waiting.setdefault(channel, []).extend(confirms)
            self._sent.clear()
            self._on_server.clear()
            self._in_flight.clear()
            server.close()
        self.empty_since_ns = 0

    # ------------------------------------------------------------------ the pool's calls

    def close_connection(self) -> None:
        """No channel was listened to for server_idle_timeout (the maintenance pass decides)."""
        self._close_server()

    def reconnect(self) -> None:
        """RECONNECT or a RELOAD with a new server login: reopen on the current login."""
        if self.server is not None:
            self._close_server()
            if self.map:
                self._ensure_connecting()

    def close(self) -> ServerConnection | None:
        """Shutdown: close the connection (returned, for the pool to wait on) and stop."""
        self.closed = True
        server = self.server
        self._close_server()
        if self._connecting is not None:
            self._connecting.cancel()
        waiting, self._waiting = self._waiting, {}
        for confirms in waiting.values():
            for confirm in confirms:
                confirm(_SHUTTING_DOWN)
        return server

    def state(self) -> str:
        if self.server is not None:
            return "open"
        if self._connecting is not None:
            return "connecting"
        return "closed"
