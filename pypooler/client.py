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

In transaction and statement mode the client's bytes go through a `RewritingFrontend` at the
moment they are written to a server (named prepared statements, session-state statements; see
rewriting.py), and each client carries its own session parameters: on every lend, the values the
server lacks are set by one Query written ahead of the client's bytes, whose reply the server's
`RewritingBackend` drops. Startup values no server has accepted yet are applied once with a round
trip of their own, so a bad value fails the client with PostgreSQL's error before anything runs.

Failure rules: a client that leaves mid-transaction takes its server down with it (a server is never
returned dirty); a server that dies under a client ends that client with an error, never silence.
A client pinned by session_state_policy = "pin" keeps its server like a session-mode client.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any, cast

from pypooler.config import Settings
from pypooler.errors import (
    NoSuchDatabase,
    PoolerError,
    ProtocolViolation,
    ServerConnectionLost,
    StartupParameterRejected,
    StatementModeTransaction,
    TooManyClients,
)
from pypooler.pool import Pool, PoolManager
from pypooler.prepared import ClientStatements
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.transaction import FrontendStream
from pypooler.rewriting import RewritingBackend, RewritingFrontend
from pypooler.server import ServerConnection, intern_parameters, tune_transport
from pypooler.session_parameters import same_value, settings_sql, startup_settings
from pypooler.session_state import EXPLANATIONS, HINTS

log = logging.getLogger("pypooler.client")

# Bytes a client may send while it waits for a server before we stop reading from it.
PENDING_LIMIT = 256 * 1024
# Seconds to wait for the postmaster to take a CancelRequest (it closes the connection when done).
CANCEL_TIMEOUT = 5.0
_TX_IDLE = c.TX_IDLE
_X = c.F_TERMINATE
# Distinct (kind, application_name) pairs counted per pool; beyond, one "(other)" per kind.
MAX_SESSION_STATE_KEYS = 1000
OTHER_APPLICATIONS = "(other)"
_MIN_LENGTH = b"\x00\x00\x00\x04"  # a message length word below this is garbage


class ClientRegistry:
    """What every client connection shares: settings, pools, live clients and their cancel keys."""

    def __init__(self, settings: Settings, manager: PoolManager) -> None:
        self.settings = settings
        self.manager = manager
        self.clients: set[ClientConnection] = set()
        self.cancel_keys: dict[tuple[int, int], ClientConnection] = {}
        self.accepting = True
        # (application_name, kind) pairs already warned about (session_state_policy = "log").
        self.warned: set[tuple[str, str]] = set()

    def new_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31), secrets.randbits(32) - (1 << 31))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def cancel(self, process_id: int, secret_key: int) -> None:
        """Forward a CancelRequest to the server the client is linked to right now, if any.

        A client that is not linked has nothing running; sending anything would risk cancelling
        another client's query on a server it no longer holds. A server with a cancel in flight
        is not lent to anyone else until the postmaster has taken it (see Pool.release), so a
        transaction that ends meanwhile cannot pass the cancel on to the next borrower.
        """
        client = self.cancel_keys.get((process_id, secret_key))
        server = client.server if client is not None else None
        if client is None or server is None:
            return
        server.cancels += 1
        asyncio.get_running_loop().create_task(send_cancel(client, server, client.pool))


async def send_cancel(client: ClientConnection, server: ServerConnection, pool: Pool) -> None:
    """Deliver `client`'s cancel to `server` with the server's own key; then let the pool lend
    the server again if it was released meanwhile."""
    login = server.login
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(login.host, login.port), CANCEL_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to %s:%d failed: %s", login.host, login.port, exc)
    else:
        try:
            if client.server is server:  # still that client's transaction
                writer.write(codec.build_cancel_request(server.process_id, server.secret_key))
                # The postmaster signals the backend, then closes: after EOF the cancel is done.
                await asyncio.wait_for(reader.read(), CANCEL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.warning("cancel request to %s:%d failed: %s", login.host, login.port, exc)
        finally:
            writer.close()
    finally:
        server.cancels -= 1
        if not server.cancels and server.release_after_cancel:
            server.release_after_cancel = False
            pool.release(server)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_early",
        "_startup_reader",
        "application_name",
        "apply_first",
        "cancel_key",
        "closed",
        "connected_ns",
        "database",
        "frontend",
        "lent_ns",
        "linking",
        "other_settings",
        "parameters",
        "peer",
        "pending",
        "pending_bytes",
        "pinned",
        "pool",
        "reading_paused",
        "ready",
        "registry",
        "rewriter",
        "server",
        "startup",
        "transport",
        "user",
        "wait_started_ns",
        "waiting",
        "writing_paused",
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
        self.lent_ns = 0
        self.pending: list[bytes] | None = None  # bytes held while waiting for a server
        self.pending_bytes = 0
        self.reading_paused = False
        self.writing_paused = False
        self._startup_reader: codec.StartupPacketReader | None = codec.StartupPacketReader()
        self._early = b""  # bytes that arrived before the welcome was sent
        self.cancel_key: tuple[int, int] | None = None
        self.peer = "?"
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.connected_ns = time.monotonic_ns()
        self.startup: codec.StartupMessage | None = None
        # Transaction/statement mode: the stream that rewrites what goes to servers.
        self.rewriter: RewritingFrontend | None = None
        # The session as the client knows it (see session_parameters.py).
        self.parameters: dict[str, str] = {}
        self.other_settings: dict[str, str] = {}
        self.apply_first = False  # startup values no server has accepted yet
        self.linking: ServerConnection | None = None  # a server applying those values
        self.pinned = False  # keeps its server until it leaves (session_state_policy = "pin")

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tune_transport(self.transport, keepalive=self.registry.settings.tcp_keepalive)
        peer: Any = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.peer = str(peer)
        self.registry.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self.ready:
            rewriter = self.rewriter
            if rewriter is not None:
                server = self.server
                if server is None:
                    if data[0] == _X and self.pending is None:
                        # The stream is read when it goes to a server, but an idle client
                        # leaving needs no server.
                        self.transport.close()
                        return
                    self._needs_server(data)
                    return
                try:
                    out = rewriter.feed_to(data, server.statements)
                except PoolerError as exc:
                    self.fail(exc)
                    return
                if out:
                    server.transport.write(out)
                if rewriter.noted:
                    self._rewriter_noted(server)
                return
            try:
                terminate = self.frontend.feed(data)
            except ProtocolViolation as exc:
                self.fail(exc)
                return
            if terminate < 0:
                server = self.server
                if server is not None:
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
            self._give_back_on_exit(server)
        if self.pinned:
            self.pool.stats.pinned -= 1
        rewriter = self.rewriter
        if rewriter is not None and rewriter.statements is not None:
            rewriter.statements.clear()
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
        if pending is not None:  # already queued for a server (or applying settings)
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
        self.pending = [data]
        self.pending_bytes = len(data)
        if server is not None:
            self.link(server)
        elif self.rewriter is not None and len(data) >= 5 and data[1:5] < _MIN_LENGTH:
            # Read when it goes to a server; but a client that is not speaking the protocol
            # is refused now rather than after waiting for one.
            self.fail(ProtocolViolation("invalid message length"))

    def link(self, server: ServerConnection) -> None:
        """Lend `server` to this client and send it what the client has sent meanwhile (called by
        the pool when a server frees up for this waiting client)."""
        other_settings = self.other_settings
        if self.parameters is server.parameters and not (other_settings or server.other_settings):
            sql = ""
        else:
            sql = settings_sql(
                self.parameters, server.parameters, other_settings, server.other_settings,
                others_unknown=server.other_settings_unknown,
            )  # fmt: skip
        rewriter = self.rewriter
        if sql and (self.apply_first or rewriter is None):
            self._apply_then_link(server, sql)
            return
        pending = self.pending
        self.pending = None
        self.pending_bytes = 0
        self._lend(server)
        if self.reading_paused:
            self.resume_reading()  # before the write, whose backpressure may pause us again
        data = b"" if not pending else pending[0] if len(pending) == 1 else b"".join(pending)
        if rewriter is None:
            if data:
                server.transport.write(data)
            return
        try:
            out = rewriter.feed_to(data, server.statements) if data else b""
        except PoolerError as exc:
            self.fail(exc)
            return
        if sql:
            # Pipelined: the settings go first and their reply is dropped (RewritingBackend).
            out = codec.build_query(sql) + out
            server.other_settings = other_settings
            server.other_settings_unknown = False
            cast(RewritingBackend, server.backend).internal += 1
        if out:
            server.transport.write(out)
        if rewriter.noted:
            self._rewriter_noted(server)

    def _apply_then_link(self, server: ServerConnection, sql: str) -> None:
        """Apply this client's settings and wait for the answer before linking: a value the
        server rejects ends the client with PostgreSQL's error before its first statement runs.
        Used once per client for startup values, and at every lend in session mode."""
        self.linking = server
        statuses: list[bytes] = []
        error: dict[str, str] | None = None
        pool = self.pool

        def on_message(msg_type: int, body: bytes) -> bool:
            nonlocal error
            if msg_type == 0:  # the server died
                self.linking = None
                if not self.closed:
                    self.fail(ServerConnectionLost("server connection closed while applying settings"))
                return True
            if msg_type == c.B_PARAMETER_STATUS:
                statuses.append(body)
            elif msg_type == c.B_ERROR_RESPONSE:
                if error is None:
                    error = codec.parse_error_fields(body)
            elif msg_type == c.B_READY_FOR_QUERY:
                self.linking = None
                if error is None:
                    server.other_settings = self.other_settings
                    server.other_settings_unknown = False
                else:
                    server.other_settings_unknown = True
                if self.closed or error is not None:
                    if body == b"I":
                        pool.release(server)
                    else:
                        server.close()
                    if error is not None and not self.closed:
                        self.fail(StartupParameterRejected(
                            error.get("M", "invalid session setting"),
                            sqlstate=error.get("C"),
                            detail="pypooler applies startup parameters when the client first"
                            " needs a server",
                        ))  # fmt: skip
                    return True
                self.apply_first = False
                self.parameters = server.parameters
                if statuses:  # the values as the server spells them
                    self.transport.write(
                        b"".join(codec.build_message(c.B_PARAMETER_STATUS, body) for body in statuses)
                    )
                self.link(server)
                return True
            return False

        server.run_internal(sql, on_message)

    def _lend(self, server: ServerConnection) -> None:
        self.server = server
        server.client = self
        self.lent_ns = time.monotonic_ns()
        statements = server.statements
        if statements is not None:
            statements.in_use.clear()  # ServerStatements.begin_lend, without a call
        if self.writing_paused:
            server.pause_reading()

    def release_server(self) -> None:
        server = self.server
        assert server is not None
        self.server = None
        server.client = None
        self.parameters = server.parameters  # what the client was last told
        pool = self.pool
        stats = pool.stats
        stats.xact_count += 1
        stats.total_hold_ns += time.monotonic_ns() - self.lent_ns
        if server.reading_paused:
            server.resume_reading()
        pool.release(server)

    def server_ready_for_query(self, data: bytes, end: int) -> None:
        """The server answered the client's last outstanding request (`end` is just past it)."""
        server = self.server
        assert server is not None
        mode = self.pool.mode
        if server.backend.tx_status == _TX_IDLE or mode == "session":
            self.transport.write(data)
            if (
                mode != "session"
                and not self.pinned
                and self.frontend.at_rest
                and server.backend.at_message_boundary
            ):
                self.release_server()
            return
        if mode == "statement":
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
        self.transport.write(data)

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
        reset_query = self.registry.settings.server_reset_query
        if not clean:
            server.close()
        elif self.pool.mode == "session" or self.pinned:
            if reset_query:
                reset_then_release(server, self.pool, reset_query)
            else:
                server.close()  # without a reset query, a pinned server's state stays dirty
        else:
            self.pool.release(server)

    def _rewriter_noted(self, server: ServerConnection) -> None:
        """Act on what the rewriter noted (off the hot path): session_state_policy, settings
        the server no longer has, the client's Terminate."""
        rewriter = self.rewriter
        assert rewriter is not None
        rewriter.noted = False
        if rewriter.terminated:
            self.transport.close()
        if rewriter.reset_seen:
            rewriter.reset_seen = False
            server.other_settings_unknown = True
        kinds = rewriter.session_state
        if not kinds:
            return
        rewriter.session_state = []
        pool = self.pool
        policy = self.registry.settings.session_state_policy
        application = self.parameters.get("application_name", self.application_name)
        counts = pool.stats.session_state
        for kind in kinds:
            key = (kind, application)
            if key not in counts and len(counts) >= MAX_SESSION_STATE_KEYS:
                key = (kind, OTHER_APPLICATIONS)  # bounded: these become metrics labels
            counts[key] += 1
            if policy == "pin":
                if not self.pinned:
                    self.pinned = True
                    pool.stats.pinned += 1
                    pool.stats.pinned_total += 1
                    log.info(
                        "client %s db=%s user=%s app=%s keeps its server until it disconnects:"
                        " %s (session_state_policy pin)",
                        self.peer, self.database, self.user, application, EXPLANATIONS[kind],
                    )
            elif policy == "log" and (application, kind) not in self.registry.warned:
                if len(self.registry.warned) >= MAX_SESSION_STATE_KEYS:
                    self.registry.warned.clear()  # bounded: warn again rather than grow
                self.registry.warned.add((application, kind))
                log.warning(
                    "db=%s user=%s app=%s: %s, so in transaction pooling the next client of that"
                    " server inherits it (%s; logged once per application and kind)",
                    self.database, self.user, application, EXPLANATIONS[kind], HINTS[kind],
                )

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
        self.startup = startup
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
            pool = registry.manager.get_pool(self.database, self.user)
            if pool is None:
                raise NoSuchDatabase(f'no such database: "{self.database}"')
        except PoolerError as exc:
            self.fail(exc)
            return
        self.pool = pool
        protocol_options = [name for name in startup.parameters if name.startswith("_pq_.")]
        if startup.protocol_version != c.PROTOCOL_3_0 or protocol_options:
            # A newer 3.x client: tell it we speak 3.0 and ignored its protocol options.
            self.transport.write(codec.build_negotiate_protocol_version(0, protocol_options))
        if pool.parameters is not None:
            self._welcome(pool.parameters)
        else:
            asyncio.get_running_loop().create_task(self._welcome_when_pool_ready())

    async def _welcome_when_pool_ready(self) -> None:
        try:
            parameters = await self.pool.ensure_parameters()
        except PoolerError as exc:
            self.fail(exc)
            return
        if not self.closed:
            self._welcome(parameters)

    def _welcome(self, parameters: Mapping[str, str]) -> None:
        settings = self.registry.settings
        pool = self.pool
        startup = self.startup
        assert startup is not None
        try:
            overrides, others = startup_settings(
                startup.parameters,
                {name.lower(): name for name in parameters},
                settings.ignore_startup_parameters,
            )
        except PoolerError as exc:
            self.fail(exc)
            return
        wanted = dict(parameters)
        if "application_name" in parameters:
            wanted["application_name"] = self.application_name
        # Values no server has accepted yet are applied once, waiting for the answer.
        apply_first = bool(others)
        for name, value in overrides.items():
            if not same_value(name, value, wanted.get(name, "")):
                wanted[name] = value
                apply_first = apply_first or name != "application_name"  # any text is valid
        self.parameters = intern_parameters(wanted)
        self.other_settings = others
        self.apply_first = apply_first
        if pool.rewriting:
            statements = ClientStatements(pool.statements) if settings.max_prepared_statements else None
            self.rewriter = RewritingFrontend(
                statements,
                tracked=pool.tracked,
                refuse=settings.session_state_policy == "error",
                verdicts=pool.verdicts,
            )
            self.frontend = self.rewriter
        self.cancel_key = self.registry.new_cancel_key(self)
        self.transport.write(
            codec.AUTHENTICATION_OK
            + codec.build_parameter_statuses(self.parameters)
            + codec.build_backend_key_data(*self.cancel_key)
            + codec.READY_FOR_QUERY_IDLE
        )
        self.ready = True
        if self.registry.settings.log_connections:
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
            self.pool.stats.errors[exc.reason] += 1
        log.log(
            logging.INFO if exc.reason in ("no_such_database",) else logging.WARNING,
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
                # DISCARD ALL dropped pypooler's statements and settings; another reset query
                # may not have: either way, forgetting is safe (see prepared.py).
                if server.statements is not None:
                    server.statements.clear()
                server.other_settings_unknown = bool(server.other_settings)
                pool.release(server)
            return True
        return False

    server.run_internal(query, on_message)
