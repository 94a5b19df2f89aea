"""ServerConnection: one pypooler-owned connection to PostgreSQL, an adapter that owns no login rule.

Lifecycle, one `ServerState` at a time (see the enum and `_NEXT`; `_set_state` is the only place
it changes, and keeps the `closed` / `lost` flags others read in step): `open_server_connection`
connects and `log_in` pumps the login machine (protocol/server_login.py), which decides
everything about the login: SSLRequest and the answer's tls_mode rules, which secret answers
which authentication request (SCRAM pass-through and channel binding included), ParameterStatus
and BackendKeyData, and the pooler error a failure is. This module only moves its bytes, logs,
and does the one step the machine cannot: `start_tls` on the same protocol object when it asks
(LOGGING_IN -> TLS_HANDSHAKE -> LOGGING_IN). Logged in (READY), the pool lends it to clients.
While lent (`client` set: a link, not a state) every read is fed to the `BackendStream` tracker
and forwarded as-is to the client; the client decides at each ReadyForQuery whether the
transaction ended. pypooler's own queries (session-mode reset, auth_query, settings, the
listener connection) run in INTERNAL and return to READY when their callback has its answer.
Otherwise the server should be silent: a FATAL error or EOF retires it, notices are dropped,
parameter changes recorded. Flow control (both directions) is flow.py's.

Rules: the forwarding branch comes first in `data_received`, before any state test, and does no
allocation when nothing is rewritten; everything else goes through `MessageReader`s. TLS changes
which transport object we hold, never the forwarding code. Nothing may follow the server's 'S'
answer in clear: such bytes would be injected into the TLS session (CVE-2021-23222), so they end
the connection (the machine's rule).

In transaction and statement mode the pool gives each server a `RewritingBackend` (see
rewriting.py) and a `ServerStatements` LRU; the bytes forwarded may then differ from the bytes
received (`backend.replaced`). `parameters` is replaced, never mutated, once logged in, and
interned, so a client can keep a reference to the set it last saw and compare it by identity.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from pypooler import flow
from pypooler.config import ServerTlsMode
from pypooler.hosts import HostList, open_stream, socket_path
from pypooler.keepalive import SocketOption, apply_keepalive
from pypooler.parameter_sets import intern_parameters
from pypooler.prepared import ServerStatements
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import (
    PoolerError,
    ProtocolViolation,
    ServerConnectFailed,
    ServerLoginFailed,
    StartupParameterRejected,
)
from pypooler.protocol.scram import Md5Hash, PlainPassword, ScramVerifier, Secret, parse_secret
from pypooler.protocol.server_login import (
    LoggedIn,
    LoginFailed,
    LoginState,
    ScramStarted,
    ServerLoginExchange,
)
from pypooler.protocol.transaction import BackendStream, releasable_after_internal

if TYPE_CHECKING:
    from pypooler.client import ClientConnection

log = logging.getLogger("pypooler.server")


def tune_transport(transport: asyncio.BaseTransport, keepalive: tuple[SocketOption, ...] = ()) -> None:
    """Keepalive options (keepalive.py; a client's come from the listener) and write-buffer marks.

    No TCP_NODELAY here: uvloop sets it on every TCP transport it creates (checked on 0.23), and
    the product runs on uvloop, so setting it again would cost a syscall per connection.
    """
    if keepalive:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            apply_keepalive(sock, keepalive)
    flow.limit_write_buffer(transport)


class ServerLogin:
    """Where and as whom to log in, with what we know of the user's password.

    `password` is the cleartext when known (configured, from auth_file, or learned from a client
    that logged in with it); `secret` a hashed form (md5 hash, SCRAM verifier); `client_key` the
    SCRAM ClientKey recovered from a client's proof against that verifier (pass-through).
    """

    __slots__ = (
        "client_key",
        "configured",
        "configured_secret",
        "connect_query",
        "database",
        "host",
        "hosts",
        "keepalive",
        "password",
        "port",
        "secret",
        "ssl_context",
        "startup",
        "tls_mode",
        "user",
    )

    def __init__(
        self,
        host: str,
        port: int,
        database: str,
        user: str,
        password: str | None,
        *,
        secret: Secret | None = None,
        tls_mode: ServerTlsMode = "disable",
        ssl_context: ssl.SSLContext | None = None,
        keepalive: tuple[SocketOption, ...] = (),
        startup: tuple[tuple[str, str], ...] = (),
        connect_query: str = "",
        hosts: HostList | None = None,
    ) -> None:
        self.host = host
        self.hosts = hosts  # several servers for the entry (hosts.py); host/port: the first
        # A [databases] entry's startup parameters for its servers, and its connect_query.
        self.startup = startup
        self.connect_query = connect_query
        self.keepalive = keepalive  # socket options for the connection (keepalive.py)
        self.port = port
        self.database = database
        self.user = user
        self.password: str | None = None
        self.secret: Md5Hash | ScramVerifier | None = None
        self.client_key: bytes | None = None
        # A password from [databases] is the operator's choice; clients never replace it.
        self.configured = password is not None
        # What the configuration says ([databases] password or auth_file), before any learning.
        self.configured_secret = parse_secret(password) if password is not None else secret
        self._store(self.configured_secret)
        self.tls_mode: ServerTlsMode = tls_mode if ssl_context is not None else "disable"
        self.ssl_context = ssl_context

    def _store(self, secret: Secret | None) -> None:
        if isinstance(secret, PlainPassword):
            self.password = secret.password
        elif secret is not None:
            self.secret = secret

    def learn(self, password: str | None, secret: Secret | None, client_key: bytes | None) -> None:
        """What a client's successful login as this same user taught us (see auth.AuthOutcome)."""
        if self.configured:
            # A configured verifier still needs the key a client proved against it.
            if client_key is not None and self.password is None and secret == self.secret:
                self.client_key = client_key
            return
        if password is not None:
            self.password = password
        elif isinstance(secret, Md5Hash | ScramVerifier):
            if secret != self.secret:
                self.secret = secret
                self.client_key = None
            if client_key is not None:
                self.client_key = client_key

    def config_key(self) -> tuple[object, ...]:
        """What the configuration decides: a RELOAD with a different key replaces the login."""
        return (
            self.host, self.port, self.database, self.user, self.configured_secret, self.tls_mode,
            self.startup, self.connect_query,
        )  # fmt: skip

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"

    def exchange(self, *, unix: bool = False) -> ServerLoginExchange:
        """A login machine with what we know now (a client may teach us more later: `learn`);
        `unix`: over a unix socket, which carries no TLS (hosts.py)."""
        return ServerLoginExchange(
            self.user, self.database, password=self.password, secret=self.secret,
            client_key=self.client_key, tls_mode="disable" if unix else self.tls_mode,
            target=self.describe(),
            startup=self.startup,
        )  # fmt: skip


class ServerState(enum.IntEnum):
    """Where a server connection is in its life. `client` (set by a lend) is not a state: a READY
    server is idle in its pool or lent, and while lent the forwarding branch reads `client` first.
    """

    LOGGING_IN = 1  # the login machine (protocol/server_login.py) reads every byte
    TLS_HANDSHAKE = 2  # start_tls is upgrading the transport; no byte may reach us in clear
    READY = 3  # logged in: idle in its pool, or lent to `client` and forwarding
    INTERNAL = 4  # pypooler's own query (run_internal, deliver_to): replies go to `_internal`
    CLOSING = 5  # close() ran: Terminate sent, the transport is closing
    CLOSED = 6  # connection_lost ran: the transport is gone


# The only transitions `_set_state` allows. INTERNAL -> INTERNAL: a callback's last message may
# release the server into the next internal query (a waiting client applying its settings).
_NEXT: Final[dict[ServerState, frozenset[ServerState]]] = {
    ServerState.LOGGING_IN: frozenset(
        {ServerState.TLS_HANDSHAKE, ServerState.READY, ServerState.CLOSING, ServerState.CLOSED}
    ),
    ServerState.TLS_HANDSHAKE: frozenset({ServerState.LOGGING_IN, ServerState.CLOSING, ServerState.CLOSED}),
    ServerState.READY: frozenset({ServerState.INTERNAL, ServerState.CLOSING, ServerState.CLOSED}),
    ServerState.INTERNAL: frozenset(
        {ServerState.INTERNAL, ServerState.READY, ServerState.CLOSING, ServerState.CLOSED}
    ),
    ServerState.CLOSING: frozenset({ServerState.CLOSED}),
    ServerState.CLOSED: frozenset(),
}


class ServerConnection(asyncio.Protocol):
    # Per-connection object: slots keep it small and attribute access fast.
    __slots__ = (
        "_internal",
        "_internal_reader",
        "_login",
        "_tls_answer",
        "address",
        "backend",
        "cancelled_ns",
        "cancels",
        "checked_ns",
        "client",
        "close_needed",
        "closed",
        "closing_ns",
        "created_ns",
        "last_used_ns",
        "login",
        "login_done",
        "lost",
        "on_close",
        "other_settings",
        "other_settings_unknown",
        "parameters",
        "process_id",
        "reading_paused",
        "release_after_cancel",
        "rewriting",
        "secret_key",
        "state",
        "statements",
        "tls",
        "transport",
    )

    def __init__(self, login: ServerLogin, login_done: asyncio.Future[None], *, unix: bool = False) -> None:
        self.login = login
        self.address = (login.host, login.port)  # the host it is connected to (one of login.hosts)
        self.state = ServerState.LOGGING_IN
        # Read on the hot path (Pool.release, flow control) and by pool.py, admin.py and tests:
        # plain attributes, changed only by _set_state (a property costs more in pure Python).
        self.closed = False
        self.lost = False
        self._login: ServerLoginExchange | None = login.exchange(unix=unix)  # until logged in
        self._tls_answer: asyncio.Future[bool] | None = None  # log_in waits on it: upgrade or not
        self.tls = False
        self._internal: Callable[[int, bytes], bool] | None = None
        self._internal_reader: codec.MessageReader | None = None
        self.login_done = login_done
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.client: ClientConnection | None = None
        self.backend = BackendStream()
        self.parameters: dict[str, str] = {}
        self.statements: ServerStatements | None = None  # transaction-mode prepared statements
        self.rewriting = False  # backend is a RewritingBackend (Pool.fit_stream)
        # Settings pypooler set here for clients that are not reported back (see
        # session_parameters.py); unknown once a client ran RESET, DISCARD ALL or SET.
        self.other_settings: dict[str, str] = {}
        self.other_settings_unknown = False
        self.cancels = 0  # CancelRequests for this server still being delivered
        self.release_after_cancel = False  # released while those were in flight
        self.process_id = 0
        self.secret_key = 0
        self.reading_paused = False  # flow.py's flag
        # Close at the next release instead of lending again (RECONNECT, RELOAD, a smaller pool,
        # server_lifetime): a mark the pool sets on a READY server, lent or idle, not a state.
        self.close_needed = False
        self.closing_ns = 0  # when close() ran: the maintenance pass bounds the backend's end
        self.cancelled_ns = 0  # when its query was last cancelled as it closed (Pool.give_back)
        self.created_ns = time.monotonic_ns()
        self.last_used_ns = self.created_ns
        self.checked_ns = 0  # the last server_check_query (maintenance.py)
        # Set by the owning pool; servers do not import pools (imports point one way).
        self.on_close: Callable[[ServerConnection], None] | None = None

    def _set_state(self, new: ServerState) -> None:
        """The one place the state changes, checked against `_NEXT`; keeps `closed`/`lost` in step."""
        if new not in _NEXT[self.state]:
            raise AssertionError(
                f"server {self.login.describe()}: no transition from {self.state.name} to {new.name}"
            )
        self.state = new
        if new is ServerState.CLOSING:
            self.closed = True
        elif new is ServerState.CLOSED:
            self.closed = self.lost = True

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # start_tls hands us the TLS transport: keep ours
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tune_transport(self.transport, self.login.keepalive)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            backend = self.backend
            try:
                end = backend.feed(data, client.frontend)
            except ProtocolViolation as exc:
                self._protocol_error(exc)
                return
            replaced = backend.replaced
            if replaced is not None:
                backend.replaced = None
                if backend.internal_error is not None:
                    self._settings_failed(client, backend.internal_error)
                    return
                data = replaced
                if not data:
                    return
            client.traffic.bytes_sent += len(data)  # type: ignore[union-attr]
            if end < 0:
                client.transport.write(data)
            else:
                client.server_ready_for_query(data, end)
            return
        state = self.state
        if state is ServerState.INTERNAL:
            self._internal_data(data)
        elif state is ServerState.READY:
            self._unlinked_data(data)
        elif state is ServerState.LOGGING_IN or state is ServerState.TLS_HANDSHAKE:
            self._login_data(data)
        # CLOSING, CLOSED: what a closed server still sends concerns nobody.

    def connection_lost(self, exc: Exception | None) -> None:
        machine = self._login
        self._set_state(ServerState.CLOSED)
        self._notify_closed()
        if machine is not None and not self.login_done.done():
            self.login_done.set_exception(machine.connection_lost(f"{exc or 'EOF'}"))
        self._answer_tls(False)
        client = self.client
        if client is not None:
            client.server_lost(self)
        if self._internal is not None:
            self._internal(0, b"")  # type 0: the connection is gone

    def pause_writing(self) -> None:
        # PostgreSQL reads slower than the client sends (e.g. COPY FROM): stop reading the client.
        flow.pause_reading(self.client)

    def resume_writing(self) -> None:
        flow.resume_reading(self.client)

    # ------------------------------------------------------------------ flow control (flow.py)

    def pause_reading(self) -> None:
        flow.pause_reading(self)

    def resume_reading(self) -> None:
        flow.resume_reading(self)

    # ------------------------------------------------------------------ login

    async def log_in(self) -> None:
        """Send the login machine's first bytes, upgrade to TLS when it asks (the one step that
        needs awaiting), and wait for the login's end; raises what it failed with."""
        machine = self._login
        assert machine is not None
        if machine.state is LoginState.TLS_ANSWER:
            answer = self._tls_answer = asyncio.get_running_loop().create_future()
            self.transport.write(machine.start())
            if await answer:
                await self._start_tls(machine)
        else:
            self.transport.write(machine.start())
        await self.login_done

    async def _start_tls(self, machine: ServerLoginExchange) -> None:
        login = self.login
        assert login.ssl_context is not None
        self._set_state(ServerState.TLS_HANDSHAKE)
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport,
                self,
                login.ssl_context,
                server_hostname=login.host if login.tls_mode == "verify-full" else None,
            )
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise ServerConnectFailed(
                f"TLS with server {login.describe()} failed: {exc}",
                hint="check server_tls_sslmode and server_tls_ca_file",
            ) from None
        if transport is None:
            raise ServerConnectFailed(f"server {login.describe()} closed the connection during TLS")
        self.transport = transport
        tune_transport(transport)  # the marks: the socket has its keepalive options already
        self.tls = True
        if self.state is not ServerState.TLS_HANDSHAKE:  # closed meanwhile: log_in raises why
            return
        self._set_state(ServerState.LOGGING_IN)
        ssl_object: Any = transport.get_extra_info("ssl_object")
        machine.tls_established(ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None)
        self._send_login_data(machine)

    def _answer_tls(self, upgrade: bool) -> None:
        answer = self._tls_answer
        if answer is not None:
            self._tls_answer = None
            if not answer.done():
                answer.set_result(upgrade)

    def _send_login_data(self, machine: ServerLoginExchange) -> None:
        out = machine.data_to_send()
        if out:
            self.transport.write(out)

    def _login_data(self, data: bytes) -> None:
        machine = self._login
        assert machine is not None
        events = machine.receive_data(data)
        self._send_login_data(machine)
        if machine.state is not LoginState.TLS_ANSWER:
            self._answer_tls(machine.state is LoginState.TLS_HANDSHAKE)
        for event in events:
            if isinstance(event, ScramStarted):
                log.debug(
                    "server %s: %s login as %r%s",
                    machine.target,
                    event.mechanism,
                    machine.user,
                    " by pass-through" if event.pass_through else "",
                )
            elif isinstance(event, LoggedIn):
                self._logged_in(machine)
            elif isinstance(event, LoginFailed):
                self._login_failed(event.error)
            # StartTls: _answer_tls woke log_in, which does the handshake.

    def _logged_in(self, machine: ServerLoginExchange) -> None:
        self._login = None
        self.parameters = machine.parameters
        self.process_id = machine.process_id
        self.secret_key = machine.secret_key
        self._set_state(ServerState.READY)
        if not self.login_done.done():
            self.login_done.set_result(None)

    def _login_failed(self, exc: PoolerError) -> None:
        if not self.login_done.done():
            self.login_done.set_exception(exc)
        self.close()

    # ------------------------------------------------------------------ internal queries

    def run_internal(self, sql: str, on_message: Callable[[int, bytes], bool]) -> None:
        """Send `sql` for pypooler's own use; `on_message(type, body)` gets each reply message
        (type 0 when the connection dies) and returns True when it wants no more."""
        self.run_internal_request(codec.build_query(sql), on_message)

    def deliver_to(self, on_message: Callable[[int, bytes], bool]) -> None:
        """Pass every message from now on to `on_message` (as `run_internal` does, without
        sending anything): the pool's listener connection (listening.py) reads its replies and
        NotificationResponses this way for as long as it lives."""
        self._internal = on_message
        self._internal_reader = codec.MessageReader()
        if not self.closed:  # a closed one calls on_message(0, ...) at connection_lost
            self._set_state(ServerState.INTERNAL)

    def run_internal_request(self, request: bytes, on_message: Callable[[int, bytes], bool]) -> None:
        """`run_internal` for prebuilt messages (e.g. Parse/Bind/Execute/Sync)."""
        self.deliver_to(on_message)
        self.transport.write(request)

    async def query_first_row(
        self, request: bytes, errors: list[dict[str, str]] | None = None
    ) -> tuple[list[bytes | None] | None, bool]:
        """Run `request` (ending in Sync or a Query) and return its first DataRow, or None, and
        whether the server may be released (`releasable_after_internal`). Raises
        ServerConnectFailed if the connection dies, or ServerLoginFailed carrying the server's
        error (unless `errors` is given: the server's error fields are put there instead)."""
        done: asyncio.Future[tuple[list[bytes | None] | None, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        first_row: list[bytes | None] | None = None
        error: dict[str, str] | None = None

        def on_message(msg_type: int, body: bytes) -> bool:
            nonlocal first_row, error
            if done.done():
                return True
            if msg_type == 0:
                done.set_exception(ServerConnectFailed("server connection closed during the query"))
                return True
            if msg_type == c.B_DATA_ROW and first_row is None:
                try:
                    first_row = codec.parse_data_row(body)
                except ProtocolViolation as exc:
                    done.set_exception(exc)
                    self.close()
                    return True
            elif msg_type == c.B_ERROR_RESPONSE:
                error = codec.parse_error_fields(body)
            elif msg_type == c.B_READY_FOR_QUERY:
                if error is not None and errors is not None:
                    errors.append(error)
                    done.set_result((None, releasable_after_internal(body)))
                elif error is not None:
                    done.set_exception(
                        ServerLoginFailed(
                            f"query failed: {error.get('M', 'unknown error')}", sqlstate=error.get("C")
                        )
                    )
                else:
                    done.set_result((first_row, releasable_after_internal(body)))
                return True
            return False

        self.run_internal_request(request, on_message)
        return await done

    def _internal_data(self, data: bytes) -> None:
        assert self._internal is not None and self._internal_reader is not None
        try:
            messages = self._internal_reader.feed(data)
        except ProtocolViolation as exc:
            self._protocol_error(exc)
            return
        for msg_type, body in messages:
            if msg_type == c.B_PARAMETER_STATUS:
                self.parameter_status(*codec.parse_parameter_status(body))
            on_message = self._internal
            assert on_message is not None
            if on_message(msg_type, body):
                # The callback may have released the server into the next internal query (a
                # client applying its settings): that one is not ours to clear.
                if self._internal is on_message:
                    self._internal = None
                    self._internal_reader = None
                    if self.state is ServerState.INTERNAL:  # not closed by the callback
                        self._set_state(ServerState.READY)
                return

    # ------------------------------------------------------------------ idle / unexpected

    def _unlinked_data(self, data: bytes) -> None:
        reader = self._internal_reader or codec.MessageReader()
        self._internal_reader = reader
        try:
            messages = reader.feed(data)
        except ProtocolViolation as exc:
            self._protocol_error(exc)
            return
        for msg_type, body in messages:
            if msg_type == c.B_ERROR_RESPONSE:
                fields = codec.parse_error_fields(body)
                log.info(
                    "server %s pid=%d closing: %s %s",
                    self.describe(),
                    self.process_id,
                    fields.get("C"),
                    fields.get("M"),
                )
                self.close()
                return
            if msg_type == c.B_PARAMETER_STATUS:
                self.parameter_status(*codec.parse_parameter_status(body))
        if not len(reader):
            self._internal_reader = None

    def parameter_status(self, name: str, value: str) -> None:
        """The server reported a new value for `name` (a new set: clients may hold the old one)."""
        if self.parameters.get(name) != value:
            self.parameters = intern_parameters({**self.parameters, name: value})

    def _settings_failed(self, client: ClientConnection, fields: dict[str, str]) -> None:
        """The settings pypooler sent ahead of a client's first message failed: the client's
        statements already went to the server, so neither can go on."""
        log.error(
            "server %s pid=%d refused session settings: %s %s",
            self.describe(),
            self.process_id,
            fields.get("C"),
            fields.get("M"),
        )
        self.client = None
        client.server = None
        client.fail(
            StartupParameterRejected(
                f"pypooler could not apply this session's settings: {fields.get('M', 'error')}",
                sqlstate=fields.get("C"),
            )
        )
        self.close()

    def _protocol_error(self, exc: ProtocolViolation) -> None:
        log.error("server %s sent bad data: %s", self.describe(), exc.message)
        self.close()

    # ------------------------------------------------------------------ helpers

    def describe(self) -> str:
        peer: Any = self.transport.get_extra_info("peername") if self.transport else None
        host, port = peer[:2] if isinstance(peer, tuple) else self.address  # a unix socket: no name
        return f"{host}:{port}"

    def close(self) -> None:
        """End the connection (a dirty or dead server is never returned to a pool).

        A logged-in server of a pool (`on_close` set) is sent Terminate and our end of the socket
        is shut for writing, but the transport stays open until PostgreSQL closes it: only then
        has the backend exited, and until then its pool keeps counting it against every bound
        (Pool.server_closed), so pool_size bounds backends, not sockets. A backend running a
        query reads the Terminate only when the query ends: the pool cancels it first where it
        may be running (Pool.give_back), and the maintenance pass aborts the transport of one
        that has not ended after BACKEND_END_TIMEOUT_S. A server still logging in, or one no
        pool counts (the advisor's, the listener connection), is closed at once.
        """
        if not self.closed:
            if self.reading_paused:
                flow.resume_reading(self)  # its EOF must be read
            logged_in = self.state is ServerState.READY or self.state is ServerState.INTERNAL
            self._set_state(ServerState.CLOSING)
            self.closing_ns = time.monotonic_ns()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(codec.TERMINATE)
                if not logged_in or self.on_close is None:
                    transport.close()  # still logging in, or no pool counts it: nothing to wait for
                elif transport.can_write_eof():
                    transport.write_eof()
                # else (TLS): the backend exits at the Terminate and its close reaches us
            elif transport is not None:
                transport.close()
            self._notify_closed()  # once: the pool may re-arm on_close for the connection's end

    async def cancel_backend(self, still_wanted: Callable[[], bool] | None = None) -> None:
        """Deliver a CancelRequest for this server's backend to its postmaster (the host this
        connection reached) and wait until the postmaster has taken it (it closes the
        connection); skipped if `still_wanted` says no once connected. Raises OSError."""
        reader, writer = await open_stream(*self.address)
        try:
            if still_wanted is None or still_wanted():
                writer.write(codec.build_cancel_request(self.process_id, self.secret_key))
                await reader.read()
        finally:
            writer.close()

    def _notify_closed(self) -> None:
        on_close = self.on_close
        if on_close is not None:
            self.on_close = None
            on_close(self)


async def open_server_connection(login: ServerLogin, timeout: float) -> ServerConnection:
    """Connect and log in to the entry's server (with several hosts, the first that accepts, in
    hosts.py's order and of the kind target_session_attrs asks for); raise ServerConnectFailed /
    ServerLoginFailed with a clear message."""
    hosts = login.hosts
    if hosts is None or len(hosts.targets) == 1:
        return await _open_one(login, login.host, login.port, timeout)
    loop = asyncio.get_running_loop()
    failure: ServerConnectFailed | None = None
    for host, port in hosts.order(loop.time()):
        try:
            server = await _open_one(login, host, port, timeout)
        except ServerLoginFailed as refused:
            if refused.sqlstate != c.SQLState.CANNOT_CONNECT_NOW:
                raise  # the server answered and refused: no other host would say otherwise
            hosts.failed((host, port), loop.time())  # starting up or shutting down: the host's state
            failure = refused
            continue
        except ServerConnectFailed as exc:
            hosts.failed((host, port), loop.time())
            failure = exc
            continue
        hosts.succeeded((host, port))
        if hosts.accepts(server.parameters):
            return server
        server.close()
        failure = ServerConnectFailed(
            f"server {host}:{port} is not {hosts.target_session_attrs}"
            f" (target_session_attrs of {login.user}@{login.database})"
        )
    assert failure is not None
    raise failure


async def _open_one(login: ServerLogin, host: str, port: int, timeout: float) -> ServerConnection:
    loop = asyncio.get_running_loop()
    login_done: asyncio.Future[None] = loop.create_future()
    where = f"{login.user}@{host}:{port}/{login.database}"
    try:
        async with asyncio.timeout(timeout):
            path = socket_path(host, port)
            server = ServerConnection(login, login_done, unix=path is not None)
            if path is None:
                await loop.create_connection(lambda: server, host, port)
            else:
                await loop.create_unix_connection(lambda: server, path)
            server.address = (host, port)
            try:
                await server.log_in()
            except BaseException:
                server.close()
                # Nobody will await it now: its exception, now or later, is not news.
                if not login_done.cancel() and not login_done.cancelled():
                    login_done.exception()
                raise
    except TimeoutError:
        raise ServerConnectFailed(
            f"could not connect to server {where}: timed out after {timeout:g} s"
        ) from None
    except OSError as exc:
        raise ServerConnectFailed(f"could not connect to server {where}: {exc.strerror or exc}") from None
    return server
