"""ClientConnection: one application connection to pypooler, an adapter with one state.

`ClientState` (changed only by `_set_state`, which checks `TRANSITIONS`): LOGGING_IN while the
sans-IO login machine (protocol/login.py, `ClientLogin`) reads the startup packets and the
authentication; this module does its I/O: the transport's TLS upgrade (`start_tls`) after an
'S', the checks before authentication (max_client_conn, the database, TLS required, hba), the
user's secret (auth_file, or auth_query through a pool: auth.py), the welcome's session
(session_parameters.py) and the cancel key. WELCOMED once the welcome is sent: the login
machine is dropped, and the streams are built only at the client's first message
(`_open_streams`), so an idle client holds no more than its session. READY: every read is fed
to the `FrontendStream` tracker and either forwarded to the linked server in one `write` of the
very bytes received, or held while the pool finds a server (the hot path tests one bool,
`ready`, kept by `_set_state`). CONSOLE: the admin console took the connection over. CLOSING:
pypooler closed it (an error; `fail`); CLOSED: connection_lost ran. Until the welcome,
`client_login_timeout` (decided by the maintenance pass, maintenance.py; no timer per client)
bounds the whole login; nothing of it touches the ready path.

Lending, by pool mode:
- transaction: a server is linked at the first message after the client is at rest and released
  at the ReadyForQuery 'I' that leaves nothing outstanding (see protocol/transaction.py);
- statement: the same, but a ReadyForQuery inside a transaction block ends the client with an error;
- session: linked at the first message, released (after `server_reset_query`) when the client leaves.
Every server comes from the pool's one lend path (pool.py): `Pool.checkout` (an idle server at
once, else a queue place) or `Pool.release` handing a server to this waiting client (`link`);
`_lend` is the client side of both. Every give-back asks the one release rule
(`protocol.transaction.releasable`, or `releasable_after_internal` after pypooler's own queries)
and goes through `Pool.release` / `Pool.give_back`; this module never touches the pool's idle
list or queue, nor the trackers' private fields.
The mode is the client's own (`mode`, the pool's at the client's first message). A RELOAD that
changes the pool's mode changes it for clients with a rewriting stream (they may follow into
session mode and back); a client that started under session mode keeps session mode, because its
prepared statements and settings live on its server only and pypooler never tracked them.

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
import enum
import logging
import pwd
import socket
import struct
import sys
import time
from collections import deque
from typing import Any, Final, cast

from pypooler import flow
from pypooler.auth import TRUSTED, ClientAuthExchange
from pypooler.config import ADMIN_DATABASE_NAMES, PoolMode, Settings
from pypooler.listening import MAX_QUEUED_NOTIFICATIONS, Listener
from pypooler.log_output import connection_line
from pypooler.parameter_sets import intern_parameters
from pypooler.pool import WELCOMES_KEPT, Pool, Welcome
from pypooler.prepared import ClientStatements
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import (
    AuthRejected,
    ClientLoginTimeout,
    NoSuchDatabase,
    PoolerError,
    ProtocolViolation,
    ServerConnectionLost,
    ServerFatalForwarded,
    StartupParameterRejected,
    StatementModeTransaction,
)
from pypooler.protocol.listen import (
    COMMITTED_TAIL,
    LISTEN,
    ListenRequest,
    listen_reply,
    listen_request,
    may_be_listen,
)
from pypooler.protocol.login import (
    AUTHENTICATED,
    CLIENT_TERMINATED,
    HELD_LIMIT,
    START_TLS,
    ClientLogin,
    LoginEvent,
)
from pypooler.protocol.scram import Secret
from pypooler.protocol.transaction import FrontendStream, backend_busy, releasable, releasable_after_internal
from pypooler.registry import ClientRegistry
from pypooler.rewriting import RewritingBackend, RewritingFrontend
from pypooler.server import ServerConnection, tune_transport
from pypooler.session_parameters import clean_ascii, same_value, settings_sql, startup_settings
from pypooler.session_state import EXPLANATIONS, HINTS
from pypooler.stats import TrafficStats
from pypooler.tls import ClientTls

log = logging.getLogger("pypooler.client")

# Bytes a client may send while it waits for a server before we stop reading from it (the bound
# on what it may send before its welcome, too).
PENDING_LIMIT = HELD_LIMIT
_TX_IDLE = c.TX_IDLE
_TX_IN_TRANSACTION = c.TX_IN_TRANSACTION
_X = c.F_TERMINATE
PEER_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED's struct ucred: pid, uid, gid
# (application_name, kind) pairs warned about at most; beyond, the set starts again.
MAX_WARNED_KEYS = 1000
_MIN_LENGTH = b"\x00\x00\x00\x04"  # a message length word below this is garbage


# A client's stream until its first message after the welcome (shared, never fed).
_NOT_READY = FrontendStream()


class ClientState(enum.IntEnum):
    """Where a client connection is; changed only by ClientConnection._set_state.

    IntEnum, as every state enum here: checking a transition hashes states, and an Enum's
    __hash__ is Python code where an int's is C (bench/README: the login path)."""

    LOGGING_IN = 1  # the login machine runs (protocol/login.py); in registry.logging_in
    # Logged in, nothing sent since the welcome: its streams are not built yet, so an idle client
    # costs no more than its session (see _open_streams).
    WELCOMED = 2
    READY = 3  # every read is framed and forwarded (data_received's hot path)
    CONSOLE = 4  # handed to the admin console, which gets the transport's callbacks
    CLOSING = 5  # pypooler closed it (an error, a shutdown); connection_lost to come
    CLOSED = 6  # connection_lost ran


_C = ClientState
TRANSITIONS: Final[dict[ClientState, frozenset[ClientState]]] = {
    _C.LOGGING_IN: frozenset({_C.WELCOMED, _C.CONSOLE, _C.CLOSING, _C.CLOSED}),
    _C.WELCOMED: frozenset({_C.READY, _C.CLOSING, _C.CLOSED}),
    _C.READY: frozenset({_C.CLOSING, _C.CLOSED}),
    _C.CONSOLE: frozenset({_C.CLOSING, _C.CLOSED}),
    _C.CLOSING: frozenset({_C.CLOSED}),
    _C.CLOSED: frozenset(),
}
_FAIL_LOG_LEVELS = {
    "no_such_database": logging.INFO,
    "shutdown": logging.DEBUG,
    # Not a PostgreSQL client at all (PostgreSQL logs it at LOG level): quiet.
    "invalid_startup_packet": logging.INFO,
}


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_peer",
        "application_name",
        "apply_first",
        "cancel_key",
        "connected_ns",
        "database",
        "frontend",
        "had_xact",
        "hog_warned",
        "idle_in_xact",
        "idle_ns",
        "idle_since_ns",
        "lent_ns",
        "listen_changes",
        "listen_due",
        "listener",
        "mode",
        "notifications",
        "other_settings",
        "parameters",
        "pending",
        "pending_bytes",
        "pinned",
        "pool",
        "query_start_ns",
        "reading_paused",
        "ready",
        "registry",
        "restore_startup",
        "rewriter",
        "server",
        "startup_values",
        "state",
        "traffic",
        "transport",
        "user",
        "wait_started_ns",
        "waited_ns",
        "waiting",
        "writing_paused",
    )

    def __init__(self, registry: ClientRegistry) -> None:
        self.registry = registry
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        # Set at the first message after the welcome (a RewritingFrontend in transaction and
        # statement mode); until then a shared one that is never fed.
        self.frontend: FrontendStream = _NOT_READY
        self.server: ServerConnection | None = None
        self.pool: Pool = None  # type: ignore[assignment]  # set before the welcome
        self.state = ClientState.LOGGING_IN
        self.wait_started_ns = 0
        self.waited_ns = 0  # how long the current hold's checkout waited
        self.lent_ns = 0
        # Timing of the current hold (see stats.py): the server answered everything and waits on
        # the client since idle_since_ns (0: it does not); idle_in_xact (below) says whether that
        # wait is inside a transaction; idle_ns sums such waits over the hold.
        self.query_start_ns = 0
        self.idle_since_ns = 0
        self.idle_ns = 0
        self.traffic: TrafficStats | None = None  # set at the welcome
        self.pending: list[bytes] | None = None  # bytes held while waiting for a server
        self.pending_bytes = 0
        # The BackendKeyData (cancel_key_of): its process id holds the slot in registry.clients
        # (ClientTable) in the low SLOT_BITS (0: not there); random bits and the secret key come
        # at the welcome (new_cancel_key).
        self.cancel_key = 0
        self._peer: str | None = None  # asked of the socket only when a log line needs it
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.connected_ns = time.monotonic_ns()
        # Transaction/statement mode: the stream that rewrites what goes to servers.
        self.rewriter: RewritingFrontend | None = None
        # The session as the client knows it (see session_parameters.py).
        self.parameters: dict[str, str] = {}
        self.other_settings: dict[str, str] = {}
        # Reported settings the startup packet set to other than the server's defaults: what a
        # RESET returns them to in PostgreSQL (restore_startup, below: one ran in the current lend).
        self.startup_values: dict[str, str] = {}
        # The pool's mode at login, then as RELOADs change it for clients with a rewriting stream
        # (Pool.reconfigure); a session-mode client keeps session mode until it leaves.
        self.mode: PoolMode = "session"
        # listen_mode = "multiplex" (listening.py): the pool's listener once this client
        # listened; LISTEN/UNLISTENs of the open transaction block, done if it commits;
        # NotificationResponses waiting for the end of the current hold; listen_due (below):
        # either of the last two is set (one test per transaction end).
        self.listener: Listener | None = None
        self.listen_changes: list[ListenRequest] | None = None
        self.notifications: deque[bytes] | None = None
        # The flags last and side by side: mypyc lays attributes out in the order they are first
        # assigned, and bools together share words where each apart takes one (an idle client's
        # memory, see README: bench idle).
        self.ready = False  # state is READY: the one test data_received makes (set by _set_state)
        self.waiting = False  # queued in pool.waiters
        self.idle_in_xact = False
        self.hog_warned = False
        self.reading_paused = False
        self.writing_paused = False
        self.restore_startup = False
        self.apply_first = False  # startup values no server has accepted yet
        self.pinned = False  # keeps its server until it leaves (session_state_policy = "pin")
        self.listen_due = False
        self.had_xact = False  # a transaction (a server lend) has ended

    def _set_state(self, new: ClientState) -> None:
        """The one place the state changes (see TRANSITIONS)."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"client {self.peer}: {old.name} -> {new.name} is not a transition")
        self.state = new
        self.ready = new is ClientState.READY
        if old is ClientState.LOGGING_IN:
            self.registry.logging_in.pop(self, None)  # the login machine goes with it

    @property
    def login(self) -> ClientLogin[ClientAuthExchange] | None:
        """The login machine: everything login-only (buffers, the auth exchange, the parsed
        startup packet); None once the login ended."""
        return self.registry.logging_in.get(self)

    @property
    def closed(self) -> bool:
        """pypooler ended the connection, or it is gone."""
        state = self.state
        return state is ClientState.CLOSING or state is ClientState.CLOSED

    @property
    def logged_in(self) -> bool:
        """The welcome was sent (and the connection is still open)."""
        state = self.state
        return state is ClientState.WELCOMED or state is ClientState.READY

    def console_closed(self) -> None:
        """The admin console that took this connection over saw it close (admin.py)."""
        if self.state is not ClientState.CLOSED:
            self._set_state(ClientState.CLOSED)

    @property
    def peer(self) -> str:
        """The client's address, for logs and the console (a getpeername() call, done once)."""
        if self._peer is None:
            peer: Any = self.transport.get_extra_info("peername") if self.transport else None
            if isinstance(peer, tuple):
                self._peer = f"{peer[0]}:{peer[1]}"
            else:  # a unix-domain socket's peer has no name
                self._peer = str(peer) if peer else "unix" if peer == "" else "?"
        return self._peer

    def _peer_os_user(self) -> str | None:
        """The operating-system user of the process at the other end of a unix-domain socket."""
        sock: Any = self.transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        _, uid, _ = PEER_CREDENTIALS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size)
        )
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def address(self) -> str:
        """The client's IP address, for hba matching (asked of the socket only then); "" for a
        client on the unix-domain socket (hba's "local" lines)."""
        peer: Any = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) else ""

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tune_transport(self.transport)  # keepalive options: inherited from the listener (app.py)
        self.registry.clients.add(self)
        self.registry.connects += 1
        self.registry.logging_in[self] = ClientLogin(tls_available=self.registry.tls is not None)

    def data_received(self, data: bytes) -> None:
        if self.ready:
            rewriter = self.rewriter
            if rewriter is not None:
                self.traffic.bytes_received += len(data)  # type: ignore[union-attr]
                server = self.server
                if server is None:
                    # The commonest event of all: the server Pool.checkout would lend now is
                    # idle and has this client's settings, so it is lent and the bytes go
                    # straight through; everything else goes through _needs_server.
                    pool = self.pool
                    server = pool.next_idle
                    if (
                        server is None
                        or self.pending is not None
                        or data[0] == _X
                        or self.parameters is not server.parameters
                        or self.other_settings
                        or server.other_settings
                        or not server.rewriting
                    ):
                        self._needs_server(data)
                        return
                    pool.checkout(self)  # lends `server`: an idle one is never queued for
                    self._lend(server, time.monotonic_ns())
                elif self.idle_since_ns:  # once per request of a multi-request hold
                    self._resumes_after_idle()
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
            except ProtocolViolation as violation:  # not `exc`: see tests/unit/test_compiled_rules.py
                self.fail(violation)
                return
            if terminate < 0:
                self.traffic.bytes_received += len(data)  # type: ignore[union-attr]
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
        if self.state is ClientState.WELCOMED:
            self._open_streams()
            self.data_received(data)
            return
        login = self.login
        if login is not None:
            self._login_data(login, data)
        # CLOSING: what follows an error is not read.

    def _open_streams(self) -> None:
        """The client's first message after the welcome: its streams are built now, not at the
        welcome, so that an idle client holds none (about 400 bytes in transaction mode). The
        pool's mode now decides: a client that has sent nothing has nothing to keep on a server."""
        pool = self.pool
        settings = self.registry.settings
        self.mode = pool.mode
        if pool.rewriting:
            statements = ClientStatements(pool.statements) if settings.max_prepared_statements else None
            self.frontend = self.rewriter = RewritingFrontend(
                statements,
                tracked=pool.tracked,
                refuse=settings.session_state_policy == "error",
                verdicts=pool.verdicts,
                intercept_listen=settings.listen_mode == "multiplex",
            )
        else:
            self.frontend = FrontendStream()
        self._set_state(ClientState.READY)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is ClientState.CLOSED:  # a failed TLS handshake may report the loss twice
            return
        login = self.login
        if login is not None:  # the client left during its login (pypooler did not close it)
            self._left_during_login(login)
        self._set_state(ClientState.CLOSED)
        registry = self.registry
        registry.clients.discard(self)
        if self.waiting:
            self.pool.cancel_wait(self)
        server = self.server
        if server is not None:
            self.account_hold(time.monotonic_ns())
            self._give_back_on_exit(server)
        if self.traffic is not None:
            self.pool.clients.pop(self, None)
            if not self.had_xact:
                self.traffic.clients_without_xact += 1
            if self.pinned:
                self.traffic.pinned -= 1
        rewriter = self.rewriter
        if rewriter is not None and rewriter.statements is not None:
            rewriter.statements.clear()
        if self.listener is not None:
            self.listener.unlisten_all(self)
        if self.pool is not None and registry.settings.log_disconnections:
            connection_line(
                "closing", self.peer, self.database, self.user, self.application_name,
                f" age={(time.monotonic_ns() - self.connected_ns) / 1e9:.3f}s",
            )  # fmt: skip

    def pause_writing(self) -> None:
        # The client reads slower than its server sends: stop reading the server.
        self.writing_paused = True
        flow.pause_reading(self.server)

    def resume_writing(self) -> None:
        self.writing_paused = False
        server = self.server
        if server is not None:
            flow.resume_reading(server)
        elif self.notifications is not None and self.pending is None:
            self._flush_notifications()

    # ------------------------------------------------------------------ flow control (flow.py)

    def pause_reading(self) -> None:
        flow.pause_reading(self)

    def resume_reading(self) -> None:
        flow.resume_reading(self)

    # ------------------------------------------------------------------ lending

    def _needs_server(self, data: bytes) -> None:
        pending = self.pending
        if pending is not None:  # already queued for a server (or applying settings)
            pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > PENDING_LIMIT:
                self.pause_reading()
            return
        rewriter = self.rewriter
        if rewriter is not None:
            if data[0] == _X:
                # The stream is read when it goes to a server, but an idle client leaving needs
                # no server.
                self.transport.close()
                return
            if rewriter.intercept_listen and may_be_listen(data):
                # A LISTEN/UNLISTEN needs no server either (listening.py).
                request = listen_request(data)
                if request is not None:
                    self._answer_listen(request, None)
                    return
        try:
            server = self.pool.checkout(self)
        except PoolerError as exc:
            self.fail(exc)
            return
        if server is None:
            self.pending = [data]
            self.pending_bytes = len(data)
            if self.rewriter is not None and len(data) >= 5 and data[1:5] < _MIN_LENGTH:
                # Read when it goes to a server; but a client that is not speaking the protocol
                # is refused now rather than after waiting for one.
                self.fail(ProtocolViolation("invalid message length"))
            return
        if self.parameters is server.parameters and not (self.other_settings or server.other_settings):
            # The common case: the server has this client's settings already.
            self._lend(server, time.monotonic_ns())
            rewriter = self.rewriter
            if rewriter is None:
                server.transport.write(data)
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
        self.pending = [data]
        self.pending_bytes = len(data)
        self._link(server, time.monotonic_ns())

    def link(self, server: ServerConnection) -> None:
        """Called by the pool when a server frees up for this waiting client.

        Under load nearly every transaction comes this way, so the common case (one read
        pending, nothing to set, the server's stream of this client's kind) skips `_link`:
        `_lend`, then the bytes through the rewriter as in `data_received`.
        """
        now = time.monotonic_ns()
        waited = self.waited_ns = now - self.wait_started_ns
        pool = self.pool
        if waited > pool.wait_warn_ns and pool.wait_warn_ns:
            pool.warn_wait(self, waited)
        rewriter = self.rewriter
        pending = self.pending
        if (
            rewriter is None
            or pending is None
            or len(pending) != 1
            or self.parameters is not server.parameters
            or self.other_settings
            or server.other_settings
            or not server.rewriting
            or self.reading_paused
        ):
            self._link(server, now)
            return
        self.pending = None
        self.pending_bytes = 0
        self._lend(server, now)
        try:
            out = rewriter.feed_to(pending[0], server.statements)
        except PoolerError as exc:
            self.fail(exc)
            return
        if out:
            server.transport.write(out)
        if rewriter.noted:
            self._rewriter_noted(server)

    def _link(self, server: ServerConnection, now: int) -> None:
        """Lend `server` to this client and send it what the client has sent meanwhile, with the
        settings the server lacks in front (see session_parameters.py)."""
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
        self._lend(server, now)
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
        statuses: list[bytes] = []
        error: dict[str, str] | None = None
        pool = self.pool

        def on_message(msg_type: int, body: bytes) -> bool:
            nonlocal error
            if msg_type == 0:  # the server died
                if not self.closed:
                    self.fail(ServerConnectionLost("server connection closed while applying settings"))
                return True
            if msg_type == c.B_PARAMETER_STATUS:
                statuses.append(body)
            elif msg_type == c.B_ERROR_RESPONSE:
                if error is None:
                    error = codec.parse_error_fields(body)
            elif msg_type == c.B_READY_FOR_QUERY:
                if error is None:
                    server.other_settings = self.other_settings
                    server.other_settings_unknown = False
                else:
                    server.other_settings_unknown = True
                if self.closed or error is not None:
                    pool.give_back(server, releasable_after_internal(body))
                    if error is not None and not self.closed:
                        self.fail(StartupParameterRejected(
                            error.get("M", "invalid session setting"),
                            sqlstate=error.get("C"),
                            detail="pypooler applies startup parameters when the client first"
                            " needs a server",
                        ))  # fmt: skip
                    return True
                if self.apply_first and self.startup_values:  # as the server spells them
                    parameters = server.parameters
                    self.startup_values = {k: parameters.get(k, v) for k, v in self.startup_values.items()}
                self.apply_first = False
                self.parameters = server.parameters
                if statuses:  # the values as the server spells them
                    self.transport.write(
                        b"".join(codec.build_message(c.B_PARAMETER_STATUS, body) for body in statuses)
                    )
                self._link(server, time.monotonic_ns())
                return True
            return False

        server.run_internal(sql, on_message)

    def _lend(self, server: ServerConnection, now: int) -> None:
        """Link `server`, which the pool just lent (Pool.checkout or Pool.release), to this client:
        the client side of every lend."""
        if (self.rewriter is None) is server.rewriting:  # only after RELOAD changed pool_mode
            self.pool.fit_stream(server, rewriting=self.rewriter is not None)
        self.server = server
        server.client = self
        self.lent_ns = self.query_start_ns = now
        statements = server.statements
        if statements is not None and statements.in_use:
            statements.in_use.clear()  # ServerStatements.begin_lend, without a call
        if self.writing_paused or not self.had_xact:
            self._lend_extras(server, now)

    def _lend_extras(self, server: ServerConnection, now: int) -> None:
        """The rare parts of a lend: a client that reads slowly, a client's first transaction."""
        if self.writing_paused:
            server.pause_reading()
        if not self.had_xact:
            self.traffic.connect_to_first_query.observe(now - self.connected_ns)  # type: ignore[union-attr]

    def _resumes_after_idle(self) -> None:
        """The client speaks again while holding a server that waited on it."""
        now = time.monotonic_ns()
        if self.idle_in_xact:
            self.idle_ns += now - self.idle_since_ns
        self.idle_since_ns = 0
        self.query_start_ns = now

    def _restore_startup_values(self) -> None:
        """A RESET or DISCARD ALL ran in the lend that just ended: where PostgreSQL returns to
        the client's startup values, the server returned to its defaults (and told the client).
        Startup values now at the default are the client's again: it is told so at once (the
        protocol allows ParameterStatus at any time) and the next lend sets them."""
        self.restore_startup = False
        told = self.parameters
        defaults = self.pool.parameters or {}
        restored = {
            name: value for name, value in self.startup_values.items()
            if told.get(name) == defaults.get(name)
        }  # fmt: skip
        if restored:
            self.parameters = intern_parameters({**told, **restored})
            self.transport.write(codec.build_parameter_statuses(restored))

    def account_hold(self, now: int) -> None:
        """Count a hold that ends other than at a ReadyForQuery (the client left)."""
        traffic = self.traffic
        assert traffic is not None
        self.had_xact = True
        traffic.hold_multi.observe(now - self.lent_ns)
        if self.idle_since_ns:
            if self.idle_in_xact:
                self.idle_ns += now - self.idle_since_ns
            self.idle_since_ns = 0
        idle = self._hold_ended(now, traffic)
        frontend = self.frontend
        statement = frontend.xact_statement
        if statement is not None:
            frontend.xact_statement = None
            frontend.xact_statement_final = False
            held = now - self.lent_ns
            self.pool.stats.account_statement(statement, held, idle, 1)

    def _hold_ended(self, now: int, traffic: TrafficStats) -> int:
        """Count the hold's checkout wait and idle-in-transaction time, returning the latter,
        and clear what was noted about the hold (the rare parts of its end)."""
        self.hog_warned = False
        idle = self.idle_ns
        if idle:
            self.idle_ns = 0
            traffic.idle_nonzero.observe(idle)
        if self.waited_ns:
            traffic.wait_nonzero.observe(self.waited_ns)
            self.waited_ns = 0
        return idle

    def server_ready_for_query(self, data: bytes, end: int) -> None:
        """The server answered the client's last outstanding request (`end` is just past it).

        In transaction and statement mode, when the release rule (`releasable`) says the server
        may go back (a ReadyForQuery 'I', both streams at rest, the client not pinned), the
        transaction has ended: the hold is counted and the server goes back to the pool, inline
        (this runs once per transaction). A hold of one request (`query_start_ns` still `lent_ns`) is
        observed once, as hold and query time both (see TrafficStats).
        """
        server: ServerConnection = self.server  # type: ignore[assignment]  # linked: it called us
        now = time.monotonic_ns()
        backend = server.backend
        status = backend.tx_status
        pool = self.pool
        mode = self.mode
        if status == _TX_IDLE and mode != "session":
            if self.listen_due:
                self._listen_at_rest(data, end)  # writes `data`, maybe once LISTENs took effect
            else:
                self.transport.write(data)
            frontend = self.frontend
            if releasable(frontend, backend, keeps_server=self.pinned):
                self.server = None
                server.client = None
                self.parameters = server.parameters  # what the client was last told
                if self.restore_startup:
                    self._restore_startup_values()
                self.had_xact = True
                traffic: TrafficStats = self.traffic  # type: ignore[assignment]
                lent = self.lent_ns
                held = now - lent
                # Histogram.pending: a list append per duration, settled in bulk.
                if self.query_start_ns == lent:
                    traffic.single.pending.append(held)
                else:
                    traffic.query_multi.pending.append(now - self.query_start_ns)
                    traffic.hold_multi.pending.append(held)
                waited = self.waited_ns
                if waited:  # every hold that queued: under load, nearly all of them
                    self.waited_ns = 0
                    traffic.wait_nonzero.pending.append(waited)
                idle = self._hold_ended(now, traffic) if self.idle_ns else 0
                statement = frontend.xact_statement
                if statement is not None:
                    # Taken here, not cleared at the lend: the statement that asked for the
                    # server was read (and noted by the tracker) before the server was lent.
                    frontend.xact_statement = None
                    frontend.xact_statement_final = False
                    pool.stats.account_transaction(statement, held, idle)
                if server.reading_paused:
                    server.resume_reading()
                pool.release(server, now)
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
        # Once per request of a multi-request hold: a list append (see Histogram.pending).
        self.traffic.query_multi.pending.append(now - self.query_start_ns)  # type: ignore[union-attr]
        # The server answered everything; from now on it waits on the client.
        self.idle_since_ns = now
        self.idle_in_xact = status != _TX_IDLE

    def server_lost(self, server: ServerConnection) -> None:
        """The linked server's connection ended under this client."""
        self.server = None
        server.client = None
        if server.backend.fatal:  # a terminated backend's 57P01, say
            self.fail(ServerFatalForwarded("closed after its server's FATAL"))
            return
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
        # The client is gone, so nothing keeps the server: only its state decides.
        clean = releasable(self.frontend, server.backend)
        reset_query = self.registry.settings.server_reset_query
        if clean and (self.mode == "session" or self.pinned):
            if reset_query:
                reset_then_release(server, self.pool, reset_query)
            else:
                server.close()  # without a reset query, a pinned server's state stays dirty
        else:
            self.pool.give_back(server, clean, busy=backend_busy(self.frontend))

    def _rewriter_noted(self, server: ServerConnection) -> None:
        """Act on what the rewriter noted (off the hot path): session_state_policy, settings
        the server no longer has, the client's Terminate."""
        rewriter = self.rewriter
        assert rewriter is not None
        rewriter.noted = False
        request = rewriter.listen_request
        if request is not None:
            rewriter.listen_request = None
            self._answer_listen(request, server)
            return
        if rewriter.discarded:
            rewriter.discarded = False
            if self.listener is not None:
                self.listener.unlisten_all(self)  # DISCARD ALL includes UNLISTEN *
        if rewriter.unlistens:
            # UNLISTENs that went to the server with other statements: done here too.
            unlistens, rewriter.unlistens = rewriter.unlistens, ()
            if self.listener is not None:
                for channel in unlistens:
                    if channel is None:
                        self.listener.unlisten_all(self)
                    else:
                        self.listener.unlisten(self, channel)
        if rewriter.terminated:
            self.transport.close()
        if rewriter.reset_seen:
            rewriter.reset_seen = False
            server.other_settings_unknown = True  # the next lend sets other_settings again
            if rewriter.settings_reset:
                rewriter.settings_reset = False
                self.restore_startup = bool(self.startup_values)
        kinds = rewriter.session_state
        if not kinds:
            return
        rewriter.session_state = ()
        traffic = self.traffic
        assert traffic is not None
        policy = self.registry.settings.session_state_policy
        application = self.parameters.get("application_name", self.application_name)
        for kind in kinds:
            traffic.session_state[kind] += 1  # bounded: stats_max_applications x kinds
            if policy == "pin":
                if not self.pinned:
                    self.pinned = True
                    rewriter.intercept_listen = False  # the server is the client's: LISTEN on it
                    traffic.pinned += 1
                    traffic.pinned_total += 1
                    self.registry.log_limiter.log(
                        log, logging.INFO, ("pin", self.database, self.user, kind),
                        "client %s db=%s user=%s app=%s keeps its server until it disconnects:"
                        " %s (session_state_policy pin)",
                        self.peer, self.database, self.user, application, EXPLANATIONS[kind],
                    )  # fmt: skip
            elif policy == "log" and (application, kind) not in self.registry.warned:
                warned = self.registry.warned
                if len(warned) >= MAX_WARNED_KEYS:
                    warned.clear()  # bounded: warn again rather than grow
                warned.add((application, kind))
                # Once per application and kind; the limiter bounds clients that make up
                # a new application_name each time.
                self.registry.log_limiter.log(
                    log, logging.WARNING, ("session_state", kind),
                    "db=%s user=%s app=%s: %s, so in transaction pooling the next client of that"
                    " server inherits it (%s; logged once per application and kind)",
                    self.database, self.user, application, EXPLANATIONS[kind], HINTS[kind],
                )  # fmt: skip

    def _terminate(self, data: bytes, offset: int) -> None:
        server = self.server
        if server is not None and offset > 0:
            server.transport.write(data[:offset])
        self.transport.close()

    # ------------------------------------------------------------------ LISTEN (listening.py)

    def _answer_listen(self, request: ListenRequest, server: ServerConnection | None) -> None:
        """Answer a LISTEN/UNLISTEN the way PostgreSQL would, without sending it to a server.

        `server`: the one the client holds, if any. Lent just for this request (the client was
        idle), it goes back to the pool untouched. In a transaction block the change waits for
        the block's end (`_listen_at_rest`); in a failed one it is refused, as PostgreSQL does.
        """
        status = _TX_IDLE
        if server is not None:
            backend = server.backend
            status = backend.tx_status
            # The rewriter took the request out of the stream (and closed an open tail, which
            # the Sync below ends on the server): the client is at rest.
            if releasable(self.frontend, backend, keeps_server=self.pinned or self.mode == "session"):
                self._give_back_unused(server, request.sync_server)
            elif status == _TX_IDLE and request.sync_server:
                # The client keeps its server (session mode since a RELOAD; or, rarer, a server
                # message is half forwarded, so the server cannot go back yet): end its batch there.
                if isinstance(backend, RewritingBackend):
                    backend.abandon_batch()
                    backend.internal += 1
                server.transport.write(codec.SYNC)
            elif status != _TX_IDLE:
                # The server still waits on the client, inside the block.
                self.idle_since_ns = time.monotonic_ns()
                self.idle_in_xact = True
                if status == _TX_IN_TRANSACTION:
                    changes = self.listen_changes
                    if changes is None:
                        changes = self.listen_changes = []
                    changes.append(request)
                    self.listen_due = True
                self.transport.write(listen_reply(request, status))
                return
        listener = self._listener()
        channel = request.channel
        if request.action == LISTEN:
            assert channel is not None
            if self.server is None and self.pending is None:
                # Hold what the client sends next until it has its answer (see the confirmation).
                self.pending = []
                self.pending_bytes = 0
                listener.listen(self, channel, lambda error: self._listen_confirmed(request, error))
                return
            listener.listen(self, channel, _ignore_confirmation)
        elif channel is None:
            listener.unlisten_all(self)
        else:
            listener.unlisten(self, channel)
        self.transport.write(listen_reply(request, status))
        if self.notifications is not None and self.server is None and self.pending is None:
            self._flush_notifications()

    def _listen_confirmed(self, request: ListenRequest, error: bytes) -> None:
        """The listener connection listens on the channel (or could not: then the client does
        not either): answer the client, then go on with what it sent meanwhile."""
        if error and self.listener is not None and request.channel is not None:
            self.listener.unlisten(self, request.channel)
        self._answer_held(listen_reply(request, _TX_IDLE, error))

    def _answer_held(self, reply: bytes) -> None:
        """Write the reply the client waited for, then go on with what it sent meanwhile."""
        if self.closed:
            return
        self.transport.write(reply)
        held = self.pending
        self.pending = None
        self.pending_bytes = 0
        if self.reading_paused:
            self.resume_reading()
        if self.notifications is not None:
            self._flush_notifications()
        if held:
            self._needs_server(b"".join(held))

    def _give_back_unused(self, server: ServerConnection, sync: bool) -> None:
        """Return a server lent for a request pypooler answered itself; `sync`: the client had
        an unsynced batch there, which pypooler's own Sync ends."""
        self.server = None
        server.client = None
        if server.reading_paused:
            server.resume_reading()
        backend = server.backend
        replies = 1 if sync else 0
        if isinstance(backend, RewritingBackend):
            if sync:
                backend.abandon_batch()
            # This client's settings may have gone ahead of the request: their reply is read
            # here instead of by the stream.
            replies += backend.internal
            backend.internal = 0
        if not replies:
            self.pool.release(server)
            return
        pool = self.pool

        def on_message(msg_type: int, body: bytes) -> bool:
            nonlocal replies
            if msg_type == c.B_READY_FOR_QUERY:
                replies -= 1
                if replies and releasable_after_internal(body):
                    return False
                pool.give_back(server, releasable_after_internal(body))
                return True
            return msg_type == 0

        server.run_internal_request(codec.SYNC if sync else b"", on_message)

    def _listener(self) -> Listener:
        listener = self.listener
        if listener is None:
            pool = self.pool
            listener = pool.listener
            if listener is None:
                listener = pool.listener = Listener(pool)
            self.listener = listener
        return listener

    def _listen_at_rest(self, data: bytes, end: int) -> None:
        """A ReadyForQuery 'I' ended the client's transaction (`data` holds it, unwritten): do
        the block's LISTEN/UNLISTENs if it committed, write `data` (once the new LISTENs took
        effect, as the COMMIT's answer means in PostgreSQL) and the notifications that waited."""
        self.listen_due = False
        changes = self.listen_changes
        unconfirmed = 1  # until every LISTEN is asked: a confirmation may come at once
        if changes is not None:
            self.listen_changes = None
            # Committed: the CommandComplete "COMMIT" right before (when this read has it; a
            # reply cut just there is taken as committed).
            if end < len(COMMITTED_TAIL) or data.endswith(COMMITTED_TAIL, 0, end):
                listener = self._listener()
                # The client has nothing outstanding: its next bytes wait for the answer.
                hold = self.frontend.at_rest and self.pending is None

                def confirmed(error: bytes) -> None:
                    nonlocal unconfirmed
                    unconfirmed -= 1
                    if not unconfirmed and hold:
                        self._answer_held(data)

                for request in changes:
                    channel = request.channel
                    if request.action == LISTEN:
                        assert channel is not None
                        if hold:
                            unconfirmed += 1
                            listener.listen(self, channel, confirmed)
                        else:
                            listener.listen(self, channel, _ignore_confirmation)
                    elif channel is None:
                        listener.unlisten_all(self)
                    else:
                        listener.unlisten(self, channel)
                unconfirmed -= 1
                if unconfirmed:
                    self.pending = []
                    self.pending_bytes = 0
                    return
        self.transport.write(data)
        if self.notifications is not None:
            self._flush_notifications()

    def notify(self, message: bytes) -> None:
        """A NotificationResponse for a channel this client listens on (from its Listener):
        written now if the client is between transactions, else when its hold ends."""
        if self.closed:
            return
        if self.server is None and self.pending is None and not self.writing_paused:
            self.transport.write(message)
            return
        queue = self.notifications
        if queue is None:
            queue = self.notifications = deque()
        elif len(queue) >= MAX_QUEUED_NOTIFICATIONS:
            queue.popleft()
            if self.listener is not None:
                self.listener.note_dropped(self.peer)
        queue.append(message)
        self.listen_due = True

    def _flush_notifications(self) -> None:
        queue = self.notifications
        self.notifications = None
        if queue and not self.closed:
            self.transport.write(b"".join(queue))

    # ------------------------------------------------------------------ login (protocol/login.py)

    def _login_data(self, login: ClientLogin[ClientAuthExchange], data: bytes) -> None:
        try:
            event = login.receive_data(data)
        except PoolerError as exc:
            self._refuse_login(login, exc)
            return
        self._login_event(login, event)

    def _refuse_login(self, login: ClientLogin[ClientAuthExchange], exc: PoolerError) -> None:
        out = login.data_to_send()  # an 'N' answered before the violation, say
        if out:
            self.transport.write(out)
        self.fail(exc)

    def _login_event(self, login: ClientLogin[ClientAuthExchange], event: LoginEvent | None) -> None:
        """Send what the login machine has to say, then act on its event."""
        if event is AUTHENTICATED:  # its last reply (SASLFinal) goes out with the welcome
            self._authenticated(login)
            return
        out = login.data_to_send()
        if out:
            self.transport.write(out)
        if event is None:
            return
        if event is START_TLS:
            tls = self.registry.tls
            assert tls is not None
            # Nothing may be read in clear from here: start_tls takes over the transport.
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._start_tls(tls))
        elif event is CLIENT_TERMINATED:
            self.transport.close()
        elif isinstance(event, codec.CancelRequest):
            self.registry.cancel(event.process_id, event.secret_key)
            self.transport.close()
        elif isinstance(event, codec.StartupMessage):
            self._start_session(login, event)

    # ------------------------------------------------------------------ TLS

    async def _start_tls(self, tls: ClientTls) -> None:
        raw = self.transport
        # client_login_timeout is decided by the maintenance pass (it closes `raw`, which ends
        # the handshake). The loop wants a handshake timeout of its own (else its default):
        # the same value, counted from later than the pass counts, so it never fires first.
        timeout = self.registry.settings.client_login_timeout or None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                raw, self, tls.context, server_side=True, ssl_handshake_timeout=timeout
            )
        except Exception as exc:  # any handshake failure ends this client only
            self._tls_failed(raw, exc)
            return
        login = self.login
        if transport is None or login is None:  # closed meanwhile
            self._tls_failed(raw, None)
            if transport is not None:
                transport.close()
            return
        self.transport = transport
        tune_transport(transport)  # keepalive options: inherited from the listener (app.py)
        try:
            event = login.tls_started()
        except PoolerError as refused:  # not `exc`: see tests/unit/test_compiled_rules.py
            self._refuse_login(login, refused)
            return
        self._login_event(login, event)

    def _tls_failed(self, raw: asyncio.Transport, exc: Exception | None) -> None:
        if exc is not None:
            self.registry.log_limiter.log(
                log, logging.INFO, ("tls_handshake",),
                "client %s: TLS handshake failed: %s", self.peer, exc,
            )  # fmt: skip
        raw.close()
        self.connection_lost(exc)

    def _peer_certificate(self, tls: bool) -> object:
        ssl_object: Any = self.transport.get_extra_info("ssl_object") if tls else None
        return ssl_object.getpeercert() if ssl_object is not None else None

    # ------------------------------------------------------------------ authentication

    def _is_console(self) -> bool:
        """The login is for the admin console (database pgbouncer/pypooler), which authenticates
        like any database, then takes the connection over."""
        return self.database in ADMIN_DATABASE_NAMES and self.registry.admin_login is not None

    def _start_session(self, login: ClientLogin[ClientAuthExchange], startup: codec.StartupMessage) -> None:
        # Interned: the clients of one database, user and application share one copy of each
        # name instead of keeping their startup packet's (about 100 bytes per idle client).
        self.user = sys.intern(startup.user)
        self.database = sys.intern(startup.database)
        self.application_name = sys.intern(startup.parameters.get("application_name", ""))
        registry = self.registry
        auth = registry.auth
        tls = registry.tls
        try:
            if not self.user:
                raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
            admin = self._is_console()
            registry.check_room(console=admin)
            database_config = None
            if not admin:
                database_config = registry.manager.admit(self.database)
            # As in PgBouncer, TLS is required of TCP clients only: libpq never asks for it over
            # a unix-domain socket, where the kernel already vouches for the peer.
            if tls is not None and tls.required and not login.tls and self.address():
                raise AuthRejected(
                    "SSL connection is required",
                    detail=f"client_tls_sslmode is {tls.mode}",
                    hint="connect with sslmode=require (or verify-ca / verify-full)",
                )
            if tls is not None and tls.mode == "verify-full" and login.tls:
                auth.check_certificate(self.user, self._peer_certificate(login.tls))
            method = auth.method_for(database_config, self.database, self.user, self.address, tls=login.tls)
            if method == "cert":
                auth.check_certificate(self.user, self._peer_certificate(login.tls))
            elif method == "peer":
                auth.check_peer(self.user, self._peer_os_user())
                method = "trust"  # nothing to exchange: the kernel vouched for the user
        except PoolerError as exc:
            self.fail(exc)
            return
        login.accept()
        out = login.data_to_send()  # a NegotiateProtocolVersion, whatever follows
        if out:
            self.transport.write(out)
        if method == "trust":  # nothing to exchange and nothing learned: no exchange object
            self._login_event(login, login.authenticate(None))
            return
        secret: Secret | None = None
        if auth.needs_secret(method):
            known, secret = auth.cached_secret(self.database, self.user)
            # auth_query needs a pool of the database: console users come from auth_file only.
            if not known and not admin:
                asyncio.get_running_loop().create_task(self._fetch_secret_then_authenticate(method))
                return
        self._begin_auth(login, method, secret)

    async def _fetch_secret_then_authenticate(self, method: str) -> None:
        try:
            secret = await self.registry.auth.fetch_secret(self.database, self.user)
        except PoolerError as exc:
            self.fail(exc)
            return
        except Exception as bug:  # a bug must end this login, not leave it hanging
            log.exception("auth_query for user %r failed", self.user)
            self.fail(PoolerError(f"internal error while looking up the password: {bug}"))
            return
        login = self.login
        if login is not None:  # else closed meanwhile
            self._begin_auth(login, method, secret)

    def _begin_auth(self, login: ClientLogin[ClientAuthExchange], method: str, secret: Secret | None) -> None:
        tls = self.registry.tls
        exchange = self.registry.auth.exchange(
            method,
            self.user,
            secret,
            channel_binding=tls.channel_binding if tls is not None and login.tls else None,
        )
        try:
            event = login.authenticate(exchange)  # goes on with what the client sent meanwhile
        except PoolerError as exc:
            self._refuse_login(login, exc)
            return
        self._login_event(login, event)

    def _authenticated(self, login: ClientLogin[ClientAuthExchange]) -> None:
        exchange = login.exchange
        outcome = exchange.outcome if exchange is not None else TRUSTED
        if self._is_console():
            startup = login.startup
            admin_login = self.registry.admin_login
            assert startup is not None and admin_login is not None
            out, early = login.hand_over()
            self._set_state(ClientState.CONSOLE)
            if out:
                self.transport.write(out)
            # From here on the console's protocol object gets this transport's callbacks.
            admin_login(self, startup, early)
            return
        try:
            pool = self.registry.manager.get_pool(self.database, self.user)
        except PoolerError as exc:  # max_auto_pools
            self.fail(exc)
            return
        if pool is None:  # the configuration cannot change under a login, but be exact
            self.fail(NoSuchDatabase(f'no such database: "{self.database}"'))
            return
        if outcome is not TRUSTED and pool.login.user == self.user:
            pool.login.learn(outcome.password, outcome.secret, outcome.client_key)
        self.pool = pool
        if pool.parameters is not None:
            self._welcome(login)
        else:
            out = login.data_to_send()
            if out:
                self.transport.write(out)
            asyncio.get_running_loop().create_task(self._welcome_when_pool_ready())

    def login_timed_out(self, timeout: float) -> None:
        if self.closed:
            return
        login = self.login
        if login is not None and login.in_tls_handshake:  # nothing can be said in clear now
            self.transport.close()
            return
        self.fail(
            ClientLoginTimeout(
                f"client_login_timeout: login not completed within {timeout:g} s",
            )
        )

    async def _welcome_when_pool_ready(self) -> None:
        try:
            await self.pool.ensure_parameters()
        except PoolerError as exc:
            self.fail(exc)
            return
        login = self.login
        if login is not None:  # else closed meanwhile
            self._welcome(login)

    def _welcome(self, login: ClientLogin[ClientAuthExchange]) -> None:
        pool = self.pool
        settings = self.registry.settings
        startup = login.startup
        assert startup is not None
        welcome = pool.welcomes.get(self._welcome_key(startup, settings))
        if welcome is None:
            try:
                worked_out = self._work_out_welcome(startup, pool, settings)
            except PoolerError as exc:
                self.fail(exc)
                return
            if not isinstance(worked_out, Welcome):
                # Values whose spelling the pool has yet to learn from a server (once each).
                out = login.data_to_send()
                if out:
                    self.transport.write(out)
                asyncio.get_running_loop().create_task(self._welcome_after_learning(worked_out))
                return
            welcome = worked_out
        traffic = self.traffic = pool.stats.for_application(self.application_name)
        traffic.logins += 1
        traffic.login.observe(time.monotonic_ns() - self.connected_ns)
        self.parameters = welcome.parameters
        self.other_settings = welcome.other_settings
        self.apply_first = welcome.apply_first
        self.startup_values = welcome.startup_values
        self.mode = pool.mode
        pool.clients[self] = None
        out, early = login.welcome(welcome.statuses, *self.registry.new_cancel_key(self))
        # The login machine (and the parsed startup packet with it) goes: an idle client keeps
        # only its session.
        self._set_state(ClientState.WELCOMED)
        self.transport.write(out)
        if settings.log_disconnections:
            _ = self.peer  # read it while the socket is open, for the line at disconnection
        if settings.log_connections:
            connection_line("login", self.peer, self.database, self.user, self.application_name)
        if early:
            self.data_received(early)

    async def _welcome_after_learning(self, unspelled: list[tuple[str, str]]) -> None:
        try:
            await self.pool.learn_spellings(unspelled)
        except PoolerError as exc:
            self.fail(exc)
            return
        login = self.login
        if login is not None:  # else closed meanwhile
            self._welcome(login)

    def _work_out_welcome(
        self, startup: codec.StartupMessage, pool: Pool, settings: Settings
    ) -> Welcome | list[tuple[str, str]]:
        """The session a login with this startup packet gets (see session_parameters.py),
        remembered by the pool for the next login with the same packet; or the reported
        (name, value) pairs whose spelling the pool must learn from a server first."""
        parameters = pool.parameters
        assert parameters is not None
        overrides, others = startup_settings(
            startup.parameters, pool.parameter_names(), settings.ignore_startup_parameters
        )
        # Reported values as the server reports them (PostgreSQL never echoes a startup
        # packet: `eucjp` is reported as `EUC_JP`); what it does not know yet is learned first.
        spellings = pool.spellings
        spelled: dict[str, str] = {}
        unspelled: list[tuple[str, str]] = []
        for name, value in overrides.items():
            if name == "application_name":
                spelled[name] = clean_ascii(value)
            elif same_value(name, value, parameters.get(name, "")):
                spelled[name] = parameters[name]  # the default, however the client spelled it
            else:
                spelling = spellings.get((name, value))
                if spelling is None:
                    unspelled.append((name, value))
                else:
                    spelled[name] = spelling
        if unspelled:
            return unspelled
        application_name = spelled.get("application_name", clean_ascii(self.application_name))
        if settings.application_name_add_host:  # as PgBouncer: " - address:port", at login only
            application_name = spelled["application_name"] = f"{application_name} - {clean_ascii(self.peer)}"
        wanted = dict(parameters)
        wanted.update(spelled)
        wanted["application_name"] = application_name
        session = intern_parameters(wanted)
        # What RESET returns the client to: its startup values of reported settings.
        startup_values = {
            name: value for name, value in spelled.items() if value != parameters.get(name)
        }  # fmt: skip
        if any(name != "application_name" for name in startup_values):
            statuses = codec.AUTHENTICATION_OK + codec.build_parameter_statuses(session)
        else:
            statuses = pool.welcome_prefix() + codec.build_parameter_status(
                "application_name", application_name
            )
        # Other settings no server has accepted yet are applied once, waiting for the answer
        # (reported ones were checked when their spelling was learned).
        welcome = Welcome(session, others, bool(others), statuses, startup_values)
        if len(pool.welcomes) >= WELCOMES_KEPT:
            pool.welcomes.clear()
        pool.welcomes[self._welcome_key(startup, settings)] = welcome
        return welcome

    def _welcome_key(self, startup: codec.StartupMessage, settings: Settings) -> bytes:
        """What a welcome is remembered by: the startup packet, and with
        application_name_add_host the client's address too."""
        return startup.raw + self.peer.encode() if settings.application_name_add_host else startup.raw

    # ------------------------------------------------------------------ errors

    def fail(self, exc: PoolerError) -> None:
        """Send `exc` as an ErrorResponse and close (all of pypooler's own errors are FATAL)."""
        self._count_error(exc.reason)
        if self.registry.settings.log_pooler_errors:
            # A client retrying a refused login would repeat this line forever: rate-limited per
            # reason, database and user (not per address, which changes with every retry).
            self.registry.log_limiter.log(
                log,
                # A drain closes every client with "shutdown": one summary line says so instead.
                _FAIL_LOG_LEVELS.get(exc.reason, logging.WARNING),
                (exc.reason, self.database, self.user),
                "client %s db=%s user=%s app=%s: %s%s",
                self.peer, self.database or "-", self.user or "-", self.application_name or "-",
                exc.message, f" ({exc.log_detail})" if exc.log_detail else "",
            )  # fmt: skip
        if not self.closed:
            if not self.transport.is_closing():
                if not exc.silent:
                    self.transport.write(exc.to_error_response())
                self.transport.close()
            self._set_state(ClientState.CLOSING)

    def terminate(self, exc: PoolerError) -> None:
        """End the client whatever it is doing (shutdown): `exc` as its FATAL error, then the
        close; only the close inside a TLS handshake (nothing can be said in clear) or when
        half a server message has been forwarded to it (an error cannot follow that). A linked
        server is closed as the client goes (see _give_back_on_exit)."""
        if self.closed:
            return
        server = self.server
        login = self.login
        if (login is not None and login.in_tls_handshake) or (
            server is not None and not server.backend.at_message_boundary
        ):
            self.transport.close()
            return
        self.fail(exc)

    def _left_during_login(self, login: ClientLogin[ClientAuthExchange]) -> None:
        """The client closed before logging in: an incomplete startup packet is logged, as
        PostgreSQL does (quietly: port scanners and health checks do this all day); a
        connection closed before sending anything is not."""
        incomplete = login.incomplete_startup_bytes()
        if incomplete:
            self.registry.errors["incomplete_startup_packet"] += 1
            self.registry.log_limiter.log(
                log, logging.INFO, ("incomplete_startup_packet",),
                "client %s: incomplete startup packet (%d bytes, then the connection closed)",
                self.peer, incomplete,
            )  # fmt: skip

    def _count_error(self, reason: str) -> None:
        if self.pool is not None:
            (self.traffic or self.pool.stats.for_application(self.application_name)).errors[reason] += 1
        else:
            self.registry.errors[reason] += 1


def _ignore_confirmation(error: bytes) -> None:
    """A LISTEN whose client was answered already (done at COMMIT): a failure is only logged
    by the listener."""


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
            if failed or not releasable_after_internal(body):
                server.close()  # the reset did not happen, or left a transaction open
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
