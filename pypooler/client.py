"""ClientConnection: one application connection to pypooler.

States: startup (SSLRequest/GSSENCRequest answered 'N', CancelRequest routed, StartupMessage read),
welcome (AuthenticationOk, the pool's ParameterStatus set, our own BackendKeyData, ReadyForQuery),
then ready. When ready, every read is fed to the `FrontendStream` tracker and either forwarded to
the linked server in one `write` of the very bytes received, or held while the pool finds a server.

Lending, by pool mode:
- transaction: a server is linked at the first message after the client is at rest and released
  at the ReadyForQuery 'I' that leaves nothing outstanding (see protocol/transaction.py);
- statement: the same, but a ReadyForQuery inside a transaction block ends the client with an error;
- session: linked at the first message, released (after `server_reset_query`) when the client leaves.

Failure rules: a client that leaves mid-transaction takes its server down with it (a server is never
returned dirty); a server that dies under a client ends that client with an error, never silence.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from pypooler.config import ADMIN_DATABASE_NAMES, Settings
from pypooler.errors import (
    DatabaseDisabled,
    NoSuchDatabase,
    PoolerError,
    ProtocolViolation,
    ServerConnectionLost,
    StatementModeTransaction,
    TooManyClients,
)
from pypooler.pool import Pool, PoolManager
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.transaction import FrontendStream
from pypooler.server import ServerConnection, tune_transport
from pypooler.stats import BOUNDS_NS, TrafficStats, bucket_of

log = logging.getLogger("pypooler.client")

CANCEL_KEY = struct.Struct("!ii")
CANCEL_KEYS_PER_BATCH = 256
# Bytes a client may send while it waits for a server before we stop reading from it.
PENDING_LIMIT = 256 * 1024
_TX_IDLE = c.TX_IDLE


_FAIL_LOG_LEVELS = {"no_such_database": logging.INFO, "shutdown": logging.DEBUG}
AdminLogin = Callable[["ClientConnection", codec.StartupMessage, bytes], None]


class ClientRegistry:
    """What every client connection shares: settings, pools, live clients and their cancel keys.

    The hooks are set by app.Pooler, so this module never imports the admin console or the app:
    `admin_login(client, startup, early_bytes)` takes over a client that asked for database
    pgbouncer/pypooler; `reload()` re-reads the configuration (raising ConfigError, the old one
    staying in force); `shutdown()` stops the pooler.
    """

    def __init__(self, settings: Settings, manager: PoolManager) -> None:
        self.settings = settings
        self.manager = manager
        # Live client connections, admin console sessions included (they count against
        # max_client_conn like any other client).
        self.clients: set[ClientConnection] = set()
        self.cancel_keys: dict[tuple[int, int], ClientConnection] = {}
        self._random_keys: list[tuple[int, int]] = []
        self.errors: Counter[str] = Counter()  # errors before a pool was chosen, by reason
        self.connects = 0  # TCP connections accepted
        self.accepting = True
        self.admin_login: AdminLogin | None = None
        self.reload: Callable[[], None] | None = None
        self.shutdown: Callable[[], None] | None = None

    def new_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        """A fresh random BackendKeyData for a client (unguessable, so nobody cancels others)."""
        while True:
            if not self._random_keys:
                # One getrandom() call per CANCEL_KEYS_PER_BATCH logins, not two per login.
                self._random_keys = list(
                    CANCEL_KEY.iter_unpack(secrets.token_bytes(CANCEL_KEY.size * CANCEL_KEYS_PER_BATCH))
                )
            pid, secret = self._random_keys.pop()
            key = (pid & 0x7FFFFFFF, secret)
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def cancel(self, process_id: int, secret_key: int) -> None:
        """Forward a CancelRequest to the server the client is linked to right now, if any.

        A client that is not linked has nothing running; sending anything would risk cancelling
        another client's query on a server it no longer holds.
        """
        client = self.cancel_keys.get((process_id, secret_key))
        server = client.server if client is not None else None
        if server is None:
            return
        login = server.login
        asyncio.get_running_loop().create_task(
            send_cancel(login.host, login.port, server.process_id, server.secret_key)
        )


async def send_cancel(host: str, port: int, process_id: int, secret_key: int) -> None:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to %s:%d failed: %s", host, port, exc)
        return
    writer.write(codec.build_cancel_request(process_id, secret_key))
    writer.close()


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_early",
        "_peer",
        "_startup_reader",
        "application_name",
        "bytes_received",
        "bytes_sent",
        "cancel_key",
        "closed",
        "connected_ns",
        "database",
        "frontend",
        "hog_warned",
        "idle_in_xact",
        "idle_ns",
        "idle_since_ns",
        "lent_ns",
        "pending",
        "pending_bytes",
        "pool",
        "query_start_ns",
        "reading_paused",
        "ready",
        "registry",
        "server",
        "traffic",
        "transport",
        "user",
        "wait_started_ns",
        "waited_ns",
        "waiting",
        "writing_paused",
        "xact_count",
    )

    def __init__(self, registry: ClientRegistry) -> None:
        self.registry = registry
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.frontend = FrontendStream()
        self.server: ServerConnection | None = None
        self.pool: Pool = None  # type: ignore[assignment]  # set before `ready`
        self.ready = False
        self.closed = False
        self.waiting = False  # queued in pool.waiters
        self.wait_started_ns = 0
        self.waited_ns = 0  # how long the current hold's checkout waited
        self.lent_ns = 0
        # Timing of the current hold (see stats.py): the server answered everything and waits on
        # the client since idle_since_ns (0: it does not); idle_in_xact says whether that wait is
        # inside a transaction; idle_ns sums such waits over the hold.
        self.query_start_ns = 0
        self.idle_since_ns = 0
        self.idle_in_xact = False
        self.idle_ns = 0
        self.hog_warned = False
        self.xact_count = 0
        self.traffic: TrafficStats | None = None  # set at the welcome
        # Counted here per read, added to `traffic` once per hold (cheaper than per read there).
        self.bytes_received = 0
        self.bytes_sent = 0
        self.pending: list[bytes] | None = None  # bytes held while waiting for a server
        self.pending_bytes = 0
        self.reading_paused = False
        self.writing_paused = False
        self._startup_reader: codec.StartupPacketReader | None = codec.StartupPacketReader()
        self._early = b""  # bytes that arrived before the welcome was sent
        self.cancel_key: tuple[int, int] | None = None
        self._peer: str | None = None  # asked of the socket only when a log line needs it
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.connected_ns = time.monotonic_ns()

    @property
    def peer(self) -> str:
        """The client's address, for logs and the console (a getpeername() call, done once)."""
        if self._peer is None:
            peer: Any = self.transport.get_extra_info("peername") if self.transport else None
            if isinstance(peer, tuple):
                self._peer = f"{peer[0]}:{peer[1]}"
            else:
                self._peer = str(peer) if peer else "?"
        return self._peer

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tune_transport(self.transport, keepalive=self.registry.settings.tcp_keepalive)
        self.registry.clients.add(self)
        self.registry.connects += 1

    def data_received(self, data: bytes) -> None:
        if self.ready:
            try:
                terminate = self.frontend.feed(data)
            except ProtocolViolation as exc:
                self.fail(exc)
                return
            if terminate < 0:
                self.bytes_received += len(data)
                server = self.server
                if server is not None:
                    if self.idle_since_ns:
                        self._resumes_after_idle()
                    server.transport.write(data)
                else:
                    self._needs_server(data)
            else:
                self._terminate(data, terminate)
            return
        self._startup_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ready = False
        registry = self.registry
        registry.clients.discard(self)
        if self.cancel_key is not None:
            registry.cancel_keys.pop(self.cancel_key, None)
        if self.waiting:
            self.pool.cancel_wait(self)
        server = self.server
        if server is not None:
            self.account_hold(time.monotonic_ns())
            self._give_back_on_exit(server)
        if self.traffic is not None:
            self.pool.clients.discard(self)
            if not self.xact_count:
                self.traffic.clients_without_xact += 1
        if self.pool is not None and registry.settings.log_disconnections:
            log.info(
                "closing: %s db=%s user=%s app=%s age=%.3fs",
                self.peer, self.database, self.user, self.application_name,
                (time.monotonic_ns() - self.connected_ns) / 1e9,
            )

    def pause_writing(self) -> None:
        # The client reads slower than its server sends: stop reading the server.
        self.writing_paused = True
        server = self.server
        if server is not None:
            server.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        server = self.server
        if server is not None:
            server.resume_reading()

    # ------------------------------------------------------------------ flow control

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ lending

    def _needs_server(self, data: bytes) -> None:
        pending = self.pending
        if pending is not None:  # already queued for a server
            pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > PENDING_LIMIT:
                self.pause_reading()
            return
        try:
            server = self.pool.checkout(self)
        except PoolerError as exc:
            self.fail(exc)
            return
        if server is None:
            self.pending = [data]
            self.pending_bytes = len(data)
            return
        self._lend(server, time.monotonic_ns())
        server.transport.write(data)

    def link(self, server: ServerConnection) -> None:
        """Called by the pool when a server frees up for this waiting client."""
        pending = self.pending
        self.pending = None
        self.pending_bytes = 0
        now = time.monotonic_ns()
        waited = self.waited_ns = now - self.wait_started_ns
        self._lend(server, now)
        warn_ms = self.pool.settings.wait_warn_ms
        if warn_ms and waited > warn_ms * 1e6:
            self.pool.warn_wait(self, waited)
        self.resume_reading()  # before the write, whose backpressure may pause us again
        if pending:
            server.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _lend(self, server: ServerConnection, now: int) -> None:
        self.server = server
        server.client = self
        self.lent_ns = self.query_start_ns = now
        if self.writing_paused:
            server.pause_reading()
        if not self.xact_count:
            self.traffic.connect_to_first_query.observe(now - self.connected_ns)  # type: ignore[union-attr]

    def _resumes_after_idle(self) -> None:
        """The client speaks again while holding a server that waited on it."""
        now = time.monotonic_ns()
        if self.idle_in_xact:
            self.idle_ns += now - self.idle_since_ns
        self.idle_since_ns = 0
        self.query_start_ns = now

    def release_server(self, now: int, bucket: int = -1) -> None:
        server = self.server
        assert server is not None
        self.server = None
        server.client = None
        self.account_hold(now, bucket)
        if server.reading_paused:
            server.resume_reading()
        self.pool.release(server)

    def account_hold(self, now: int, bucket: int = -1) -> None:
        """Count the hold that ends now: the transaction as the pool saw it.

        `bucket`: the histogram bucket of this hold if the caller already found it.
        """
        held = now - self.lent_ns
        if bucket < 0:
            bucket = bucket_of(held)
        idle = self.idle_ns
        if self.idle_since_ns:
            if self.idle_in_xact:
                idle += now - self.idle_since_ns
            self.idle_since_ns = 0
        self.idle_ns = 0
        self.hog_warned = False
        self.xact_count += 1
        traffic = self.traffic
        assert traffic is not None
        traffic.xact_count += 1
        traffic.bytes_received += self.bytes_received
        traffic.bytes_sent += self.bytes_sent
        self.bytes_received = self.bytes_sent = 0
        traffic.hold.observe_at(bucket, held)
        if idle:
            traffic.idle_nonzero.observe(idle)
        if self.waited_ns:
            traffic.wait_nonzero.observe(self.waited_ns)
            self.waited_ns = 0
        # Taken here, not cleared at the lend: the statement that asked for the server was read
        # (and noted by the tracker) before the server was lent.
        frontend = self.frontend
        statement = frontend.xact_statement
        if statement is not None:
            frontend.xact_statement = None
            frontend.xact_statement_final = False
            self.pool.stats.account_statement(statement, bucket, held, idle)

    def server_ready_for_query(self, data: bytes, end: int) -> None:
        """The server answered the client's last outstanding request (`end` is just past it)."""
        server = self.server
        assert server is not None
        now = time.monotonic_ns()
        traffic = self.traffic
        assert traffic is not None
        traffic.query_count += 1
        query_ns = now - self.query_start_ns
        bucket = bisect_left(BOUNDS_NS, query_ns)
        traffic.query.observe_at(bucket, query_ns)
        mode = self.pool.mode
        backend = server.backend
        status = backend.tx_status
        if status == _TX_IDLE or mode == "session":
            self.transport.write(data)
            if (
                mode != "session"
                and self.frontend.at_rest
                and not (backend._skip or backend._head)  # at a message boundary
            ):
                # A one-request transaction: its hold is its query time, same bucket.
                self.release_server(now, bucket if self.query_start_ns == self.lent_ns else -1)
                return
        elif mode == "statement":
            # Keep the ReadyForQuery back: the client must not think its transaction is open.
            if end > 6:
                self.transport.write(data[: end - 6])
            self.fail(
                StatementModeTransaction(
                    "transaction blocks are not allowed in statement pooling mode",
                    hint="use transaction pool_mode for this database, or run without BEGIN",
                )
            )
            return
        else:
            self.transport.write(data)
        # The server answered everything; from now on it waits on the client.
        self.idle_since_ns = now
        self.idle_in_xact = status != _TX_IDLE

    def server_lost(self, server: ServerConnection) -> None:
        """The linked server's connection ended under this client."""
        self.server = None
        server.client = None
        self.fail(
            ServerConnectionLost(
                "server connection closed unexpectedly during the transaction",
                detail="the transaction was not committed by pypooler; its outcome is unknown"
                if not self.frontend.at_rest
                else None,
                hint="the server may have been restarted or the backend terminated; reconnect",
            )
        )

    def _give_back_on_exit(self, server: ServerConnection) -> None:
        """The client left while linked: return the server only if it is provably clean."""
        self.server = None
        server.client = None
        if server.reading_paused:
            server.resume_reading()
        clean = (
            self.frontend.at_rest
            and server.backend.at_message_boundary
            and server.backend.tx_status == _TX_IDLE
        )
        if not clean:
            server.close()
        elif self.pool.mode == "session" and self.registry.settings.server_reset_query:
            reset_then_release(server, self.pool, self.registry.settings.server_reset_query)
        else:
            self.pool.release(server)

    def _terminate(self, data: bytes, offset: int) -> None:
        server = self.server
        if server is not None and offset > 0:
            server.transport.write(data[:offset])
        self.transport.close()

    # ------------------------------------------------------------------ startup

    def _startup_data(self, data: bytes) -> None:
        reader = self._startup_reader
        if reader is None:  # welcome in progress; keep what the client sent for later
            self._early += data
            return
        try:
            packet = reader.feed(data)
        except PoolerError as exc:
            self.fail(exc)
            return
        if packet is None:
            return
        if isinstance(packet, codec.SSLRequest | codec.GSSENCRequest):
            self.transport.write(b"N")  # no TLS / GSS encryption (yet): the client goes on in clear
            rest = reader.take_rest()
            if rest:
                self._startup_data(rest)
        elif isinstance(packet, codec.CancelRequest):
            self.registry.cancel(packet.process_id, packet.secret_key)
            self.transport.close()
        else:
            self._startup_reader = None
            self._early = reader.take_rest()
            self._start_session(packet)

    def _start_session(self, startup: codec.StartupMessage) -> None:
        self.user = startup.user
        self.database = startup.database
        self.application_name = startup.parameters.get("application_name", "")
        registry = self.registry
        try:
            if not self.user:
                raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
            if len(registry.clients) > registry.settings.max_client_conn:
                raise TooManyClients(
                    "no more connections allowed (max_client_conn)",
                    detail=f"max_client_conn is {registry.settings.max_client_conn}",
                )
            if self.database in ADMIN_DATABASE_NAMES and registry.admin_login is not None:
                self._negotiate_protocol(startup)
                early, self._early = self._early, b""
                # From here on the console's protocol object gets this transport's callbacks.
                registry.admin_login(self, startup, early)
                return
            if self.database in registry.manager.disabled:
                raise DatabaseDisabled(
                    f'database "{self.database}" does not allow connections now',
                    hint="an administrator ran DISABLE on the admin console; ENABLE allows them again",
                )
            pool = registry.manager.get_pool(self.database, self.user)
            if pool is None:
                raise NoSuchDatabase(f'no such database: "{self.database}"')
        except PoolerError as exc:
            self.fail(exc)
            return
        self.pool = pool
        self._negotiate_protocol(startup)
        if pool.parameters is not None:
            self._welcome()
        else:
            asyncio.get_running_loop().create_task(self._welcome_when_pool_ready())

    def _negotiate_protocol(self, startup: codec.StartupMessage) -> None:
        protocol_options = [name for name in startup.parameters if name.startswith("_pq_.")]
        if startup.protocol_version != c.PROTOCOL_3_0 or protocol_options:
            # A newer 3.x client: tell it we speak 3.0 and ignored its protocol options.
            self.transport.write(codec.build_negotiate_protocol_version(0, protocol_options))

    async def _welcome_when_pool_ready(self) -> None:
        try:
            await self.pool.ensure_parameters()
        except PoolerError as exc:
            self.fail(exc)
            return
        if not self.closed:
            self._welcome()

    def _welcome(self) -> None:
        pool = self.pool
        traffic = self.traffic = pool.stats.for_application(self.application_name)
        traffic.logins += 1
        traffic.login.observe(time.monotonic_ns() - self.connected_ns)
        pool.clients.add(self)
        self.cancel_key = self.registry.new_cancel_key(self)
        self.transport.write(
            pool.welcome_prefix()
            + codec.build_parameter_status("application_name", self.application_name)
            + codec.build_backend_key_data(*self.cancel_key)
            + codec.READY_FOR_QUERY_IDLE
        )
        self.ready = True
        settings = self.registry.settings
        if settings.log_disconnections:
            _ = self.peer  # read it while the socket is open, for the line at disconnection
        if settings.log_connections:
            log.info(
                "login: %s db=%s user=%s app=%s",
                self.peer, self.database, self.user, self.application_name,
            )
        early = self._early
        if early:
            self._early = b""
            self.data_received(early)

    # ------------------------------------------------------------------ errors

    def fail(self, exc: PoolerError) -> None:
        """Send `exc` as an ErrorResponse and close (all of pypooler's own errors are FATAL)."""
        if self.pool is not None:
            (self.traffic or self.pool.stats.for_application(self.application_name)).errors[
                exc.reason
            ] += 1
        else:
            self.registry.errors[exc.reason] += 1
        log.log(
            # A drain closes every client with "shutdown": one summary line says so instead.
            _FAIL_LOG_LEVELS.get(exc.reason, logging.WARNING),
            "client %s db=%s user=%s app=%s: %s",
            self.peer, self.database or "-", self.user or "-", self.application_name or "-",
            exc.message,
        )
        if not self.closed and not self.transport.is_closing():
            self.transport.write(exc.to_error_response())
            self.transport.close()
        self.closed = True


def reset_then_release(server: ServerConnection, pool: Pool, query: str) -> None:
    """Run `server_reset_query` (session mode) and give the server back only if it went clean."""
    failed = False

    def on_message(msg_type: int, body: bytes) -> bool:
        nonlocal failed
        if msg_type == 0:
            return True
        if msg_type == c.B_ERROR_RESPONSE:
            failed = True
        elif msg_type == c.B_READY_FOR_QUERY:
            if failed or body != b"I":
                server.close()
            else:
                pool.release(server)
            return True
        return False

    server.run_internal(query, on_message)
