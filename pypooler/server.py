"""ServerConnection: one pypooler-owned connection to PostgreSQL.

Lifecycle: `open_server_connection` connects and logs in (trust, cleartext, md5, SCRAM-SHA-256),
capturing ParameterStatus and BackendKeyData; the pool then lends it to clients. While lent
(`client` set) every read is fed to the `BackendStream` tracker and forwarded as-is to the client;
the client decides at each ReadyForQuery whether the transaction ended. While not lent, the server
should be silent: a FATAL error or EOF retires it, notices are dropped, parameter changes recorded.

Rules: the forwarding branch comes first in `data_received` and does no allocation; everything
else (login, internal queries such as the session-mode reset) goes through `MessageReader`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from scramp import ScramClient, ScramException

from pypooler.errors import PoolerError, ProtocolViolation, ServerConnectFailed, ServerLoginFailed
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.transaction import BackendStream

if TYPE_CHECKING:
    from pypooler.client import ClientConnection

log = logging.getLogger("pypooler.server")

# Write-buffer marks for both sides of the proxy. High enough that a normal result never pauses,
# low enough that a slow reader bounds what we hold per connection.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


def tune_transport(transport: asyncio.BaseTransport, *, keepalive: bool = True) -> None:
    """Keepalive and write-buffer marks.

    No TCP_NODELAY here: uvloop sets it on every TCP transport it creates (checked on 0.23), and
    the product runs on uvloop, so setting it again would cost a syscall per connection.
    """
    if keepalive:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    cast(asyncio.WriteTransport, transport).set_write_buffer_limits(
        high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER
    )


class ServerLogin:
    """Where and as whom to log in."""

    __slots__ = ("database", "host", "password", "port", "user")

    def __init__(self, host: str, port: int, database: str, user: str, password: str | None) -> None:
        self.host = host
        self.port = port
        self.database = database
        self.user = user
        self.password = password

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


class ServerConnection(asyncio.Protocol):
    # Per-connection object: slots keep it small and attribute access fast.
    __slots__ = (
        "_internal",
        "_internal_reader",
        "_logging_in",
        "_login_reader",
        "_scram",
        "backend",
        "client",
        "close_needed",
        "closed",
        "created_ns",
        "last_used_ns",
        "login",
        "login_done",
        "on_close",
        "parameters",
        "process_id",
        "reading_paused",
        "secret_key",
        "transport",
    )

    def __init__(self, login: ServerLogin, login_done: asyncio.Future[None]) -> None:
        self.login = login
        self._logging_in = True
        self._login_reader = codec.MessageReader()
        self._scram: ScramClient | None = None
        self._internal: Callable[[int, bytes], bool] | None = None
        self._internal_reader: codec.MessageReader | None = None
        self.login_done = login_done
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.client: ClientConnection | None = None
        self.backend = BackendStream()
        self.parameters: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        self.reading_paused = False
        self.closed = False
        # Close at the next release instead of lending again (RECONNECT, RELOAD, a smaller pool).
        self.close_needed = False
        self.created_ns = time.monotonic_ns()
        self.last_used_ns = self.created_ns
        # Set by the owning pool; servers do not import pools (imports point one way).
        self.on_close: Callable[[ServerConnection], None] | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        tune_transport(self.transport)
        login = self.login
        self.transport.write(
            codec.build_startup_message({"user": login.user, "database": login.database})
        )

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            try:
                end = self.backend.feed(data, client.frontend)
            except ProtocolViolation as exc:
                self._protocol_error(exc)
                return
            client.bytes_sent += len(data)
            if end < 0:
                client.transport.write(data)
            else:
                client.server_ready_for_query(data, end)
            return
        if self._logging_in:
            self._login_data(data)
        elif self._internal is not None:
            self._internal_data(data)
        else:
            self._unlinked_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._notify_closed()
        if not self.login_done.done():
            self.login_done.set_exception(
                ServerConnectFailed(f"server closed the connection during login: {exc or 'EOF'}")
            )
        client = self.client
        if client is not None:
            client.server_lost(self)
        if self._internal is not None:
            self._internal(0, b"")  # type 0: the connection is gone

    def pause_writing(self) -> None:
        # PostgreSQL reads slower than the client sends (e.g. COPY FROM): stop reading the client.
        client = self.client
        if client is not None:
            client.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.resume_reading()

    # ------------------------------------------------------------------ flow control

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ login

    def _login_data(self, data: bytes) -> None:
        try:
            for msg_type, body in self._login_reader.feed(data):
                self._login_message(msg_type, body)
                if not self._logging_in:
                    break
        except PoolerError as exc:
            self._login_failed(exc)
        except (ScramException, ValueError) as exc:  # ValueError: undecodable SASL payload
            self._login_failed(ServerLoginFailed(f"SCRAM authentication with the server failed: {exc}"))

    def _login_message(self, msg_type: int, body: bytes) -> None:
        login = self.login
        if msg_type == c.B_AUTHENTICATION:
            self._authenticate(login, *codec.parse_authentication(body))
        elif msg_type == c.B_PARAMETER_STATUS:
            name, value = codec.parse_parameter_status(body)
            self.parameters[name] = value
        elif msg_type == c.B_BACKEND_KEY_DATA:
            self.process_id, self.secret_key = codec.parse_backend_key_data(body)
        elif msg_type == c.B_READY_FOR_QUERY:
            self._logging_in = False
            self._scram = None
            if self._login_reader and len(self._login_reader):
                # Nothing may follow ReadyForQuery before we ask; treat it as a broken server.
                raise ProtocolViolation("server sent data after ReadyForQuery during login")
            self.login_done.set_result(None)
        elif msg_type == c.B_ERROR_RESPONSE:
            fields = codec.parse_error_fields(body)
            raise ServerLoginFailed(
                f"server login failed: {fields.get('M', 'unknown error')}",
                detail=f"pypooler could not log in to {login.describe()}",
                sqlstate=fields.get("C"),
            )
        elif msg_type == c.B_NOTICE_RESPONSE:
            pass
        else:
            raise ProtocolViolation(f"unexpected message {chr(msg_type)!r} from server during login")

    def _authenticate(self, login: ServerLogin, code: int, payload: bytes) -> None:
        if code == c.AUTH_OK:
            return
        if code in (c.AUTH_CLEARTEXT, c.AUTH_MD5, c.AUTH_SASL) and login.password is None:
            raise ServerLoginFailed(
                f"server asks for a password for user {login.user!r} but none is configured",
                hint="set password in the [databases] entry",
            )
        password = login.password or ""
        if code == c.AUTH_CLEARTEXT:
            self.transport.write(codec.build_password_message(password.encode()))
        elif code == c.AUTH_MD5:
            inner = hashlib.md5((password + login.user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + payload[:4]).hexdigest()
            self.transport.write(codec.build_password_message(b"md5" + outer.encode()))
        elif code == c.AUTH_SASL:
            mechanisms = codec.parse_sasl_mechanisms(payload)
            if "SCRAM-SHA-256" not in mechanisms:
                raise ServerLoginFailed(
                    f"server offers SASL mechanisms {mechanisms}, pypooler supports SCRAM-SHA-256"
                )
            self._scram = ScramClient(["SCRAM-SHA-256"], login.user, password)
            first = self._scram.get_client_first().encode()
            self.transport.write(codec.build_sasl_initial_response("SCRAM-SHA-256", first))
        elif code == c.AUTH_SASL_CONTINUE:
            if self._scram is None:
                raise ProtocolViolation("server sent SASLContinue without SASL")
            self._scram.set_server_first(payload.decode())
            self.transport.write(codec.build_sasl_response(self._scram.get_client_final().encode()))
        elif code == c.AUTH_SASL_FINAL:
            if self._scram is None:
                raise ProtocolViolation("server sent SASLFinal without SASL")
            self._scram.set_server_final(payload.decode())  # verifies the server's signature
        else:
            method = c.AUTH_METHOD_NAMES.get(code, f"code {code}")
            raise ServerLoginFailed(
                f"server requested authentication method {method}, which pypooler does not support",
                hint="allow md5, scram-sha-256, password or trust for pypooler in pg_hba.conf",
            )

    def _login_failed(self, exc: PoolerError) -> None:
        if not self.login_done.done():
            self.login_done.set_exception(exc)
        self.close()

    # ------------------------------------------------------------------ internal queries

    def run_internal(self, sql: str, on_message: Callable[[int, bytes], bool]) -> None:
        """Send `sql` for pypooler's own use; `on_message(type, body)` gets each reply message
        (type 0 when the connection dies) and returns True when it wants no more."""
        self._internal = on_message
        self._internal_reader = codec.MessageReader()
        self.transport.write(codec.build_query(sql))

    def _internal_data(self, data: bytes) -> None:
        assert self._internal is not None and self._internal_reader is not None
        try:
            messages = self._internal_reader.feed(data)
        except ProtocolViolation as exc:
            self._protocol_error(exc)
            return
        for msg_type, body in messages:
            if msg_type == c.B_PARAMETER_STATUS:
                name, value = codec.parse_parameter_status(body)
                self.parameters[name] = value
            if self._internal(msg_type, body):
                self._internal = None
                self._internal_reader = None
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
                    self.describe(), self.process_id, fields.get("C"), fields.get("M"),
                )
                self.close()
                return
            if msg_type == c.B_PARAMETER_STATUS:
                name, value = codec.parse_parameter_status(body)
                self.parameters[name] = value
        if not len(reader):
            self._internal_reader = None

    def _protocol_error(self, exc: ProtocolViolation) -> None:
        log.error("server %s sent bad data: %s", self.describe(), exc.message)
        self.close()

    # ------------------------------------------------------------------ helpers

    def describe(self) -> str:
        peer: Any = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    def close(self) -> None:
        """Close at once (a dirty or dead server is never returned to a pool)."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                if not self.transport.is_closing():
                    self.transport.write(codec.TERMINATE)
                self.transport.close()
        self._notify_closed()

    def _notify_closed(self) -> None:
        on_close = self.on_close
        if on_close is not None:
            self.on_close = None
            on_close(self)


async def open_server_connection(login: ServerLogin, timeout: float) -> ServerConnection:
    """Connect and log in; raise ServerConnectFailed / ServerLoginFailed with a clear message."""
    loop = asyncio.get_running_loop()
    login_done: asyncio.Future[None] = loop.create_future()
    try:
        async with asyncio.timeout(timeout):
            _, server = await loop.create_connection(
                lambda: ServerConnection(login, login_done), login.host, login.port
            )
            try:
                await login_done
            except BaseException:
                server.close()
                raise
    except TimeoutError:
        raise ServerConnectFailed(
            f"could not connect to server {login.describe()}: timed out after {timeout:g} s"
        ) from None
    except OSError as exc:
        raise ServerConnectFailed(
            f"could not connect to server {login.describe()}: {exc.strerror or exc}"
        ) from None
    return server
