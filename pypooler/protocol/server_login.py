"""pypooler logging in to PostgreSQL, as a sans-IO state machine: bytes in, bytes and events out.

`ServerLoginExchange` knows the login's order and its rules; the connection (server.py) only
writes what `data_to_send` returns, feeds what the server sends to `receive_data`, acts on the
events, and does the one thing a machine cannot: the TLS handshake when `StartTls` asks for it.
No sockets, no clock, no asyncio; the login's values come in as plain values (no config objects).

    state           on                                   next state, and what it does
    TLS_ANSWER      'S'                                  TLS_HANDSHAKE (event StartTls)
                    'N', tls_mode prefer                 AUTHENTICATING (sends the StartupMessage)
                    'N', another tls_mode                FAILED (ServerConnectFailed)
    TLS_HANDSHAKE   tls_established(certificate)         AUTHENTICATING (sends the StartupMessage)
    AUTHENTICATING  AuthenticationOk                     STARTING
                    a password / SASL request            AUTHENTICATING (sends the answer)
    STARTING        ParameterStatus, BackendKeyData      STARTING (collected)
                    ReadyForQuery                        LOGGED_IN (event LoggedIn)
    any but the last two: ErrorResponse                  FAILED (event LoginFailed)

Rules kept here:
- Nothing may follow the server's one-byte answer to SSLRequest before the handshake: such bytes
  would be read as if they came through TLS (CVE-2021-23222), so they fail the login; nor may
  anything follow ReadyForQuery before we ask.
- A NoticeResponse during login is dropped; any other message out of order is a protocol
  violation (08P01). The server's own ErrorResponse keeps its SQLSTATE (ServerLoginFailed).
- Secrets: the cleartext password answers every method; an MD5 hash answers md5; a SCRAM verifier
  answers SCRAM-SHA-256 only with a ClientKey a client proved (pass-through). What cannot answer
  the server's request says so (`_only_hashed`) instead of sending something that must fail.
- Channel binding (SCRAM-SHA-256-PLUS) only over TLS and only when the server offers it.
"""

from __future__ import annotations

import enum
from typing import Final

from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import (
    PoolerError,
    ProtocolViolation,
    ServerAuthIncomplete,
    ServerConnectFailed,
    ServerLoginFailed,
)
from pypooler.protocol.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    Md5Hash,
    ScramClientExchange,
    ScramProofMismatch,
    ScramVerifier,
    certificate_hash,
    md5_hash,
    md5_response,
)


class LoginState(enum.IntEnum):
    TLS_ANSWER = 1  # waiting for the one-byte answer to SSLRequest
    TLS_HANDSHAKE = 2  # the connection is being upgraded to TLS (the adapter's job)
    AUTHENTICATING = 3  # StartupMessage sent: answering authentication requests
    STARTING = 4  # authenticated: collecting ParameterStatus and BackendKeyData until ReadyForQuery
    LOGGED_IN = 5  # ReadyForQuery received: the connection is usable
    FAILED = 6  # the login failed: `error` says why


# The transitions the table above allows, as data: `_change` refuses any other (a bug here).
_NEXT: Final[dict[LoginState, frozenset[LoginState]]] = {
    LoginState.TLS_ANSWER: frozenset(
        {LoginState.TLS_HANDSHAKE, LoginState.AUTHENTICATING, LoginState.FAILED}
    ),
    LoginState.TLS_HANDSHAKE: frozenset({LoginState.AUTHENTICATING, LoginState.FAILED}),
    LoginState.AUTHENTICATING: frozenset({LoginState.STARTING, LoginState.FAILED}),
    LoginState.STARTING: frozenset({LoginState.LOGGED_IN, LoginState.FAILED}),
    LoginState.LOGGED_IN: frozenset(),
    LoginState.FAILED: frozenset(),
}


class StartTls:
    """The server answered 'S': upgrade the connection, then call `tls_established`."""

    __slots__ = ()


class ScramStarted:
    """A SCRAM exchange began (for the log: which mechanism, by pass-through or not)."""

    __slots__ = ("mechanism", "pass_through")

    def __init__(self, mechanism: str, pass_through: bool) -> None:
        self.mechanism = mechanism
        self.pass_through = pass_through


class LoggedIn:
    """ReadyForQuery: `parameters`, `process_id` and `secret_key` of the exchange are final."""

    __slots__ = ()


class LoginFailed:
    __slots__ = ("error",)

    def __init__(self, error: PoolerError) -> None:
        self.error = error


LoginEvent = StartTls | ScramStarted | LoggedIn | LoginFailed

_START_TLS: Final = StartTls()
_LOGGED_IN: Final = LoggedIn()


class ServerLoginExchange:
    """One login to one server. `target` names it in messages (user@host:port/database).

    `password` is the cleartext when known; `secret` a hashed form (MD5 hash, SCRAM verifier);
    `client_key` the SCRAM ClientKey recovered from a client's proof against that verifier.
    `tls_mode` is server_tls_sslmode: "disable" sends no SSLRequest, "prefer" goes on in clear
    when the server has no TLS, the others fail then.
    """

    __slots__ = (
        "_certificate",
        "_out",
        "_reader",
        "_scram",
        "client_key",
        "database",
        "error",
        "parameters",
        "password",
        "process_id",
        "secret",
        "secret_key",
        "startup",
        "state",
        "target",
        "tls",
        "tls_mode",
        "user",
    )

    def __init__(
        self,
        user: str,
        database: str,
        *,
        password: str | None = None,
        secret: Md5Hash | ScramVerifier | None = None,
        client_key: bytes | None = None,
        tls_mode: str = "disable",
        target: str = "",
        startup: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.user = user
        self.database = database
        self.startup = startup  # more startup parameters (a [databases] entry's client_encoding...)
        self.password = password
        self.secret = secret
        self.client_key = client_key
        self.tls_mode = tls_mode
        self.target = target or f"{user}/{database}"
        self.state = LoginState.TLS_ANSWER if tls_mode != "disable" else LoginState.AUTHENTICATING
        self.tls = False
        self.error: PoolerError | None = None
        self.parameters: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        self._reader = codec.MessageReader()
        self._scram: ScramClientExchange | None = None
        self._certificate: bytes | None = None
        self._out: list[bytes] = []

    # ------------------------------------------------------------------ the adapter's calls

    def start(self) -> bytes:
        """The first bytes to send: an SSLRequest when TLS is wanted, else the StartupMessage."""
        if self.state is LoginState.TLS_ANSWER:
            return codec.build_ssl_request()
        return self._startup_message()

    def receive_data(self, data: bytes) -> list[LoginEvent]:
        """Take bytes from the server; what to answer is then in `data_to_send`."""
        state = self.state
        if state is LoginState.LOGGED_IN or state is LoginState.FAILED:
            return []
        try:
            if state is LoginState.TLS_ANSWER:
                return self._tls_answer(data)
            if state is LoginState.TLS_HANDSHAKE:
                raise ProtocolViolation("server sent data during the TLS handshake")
            return self._messages(data)
        except PoolerError as exc:
            return [self._fail(exc)]
        except ScramProofMismatch as mismatch:
            # Its own name: compiled, one name bound by two `except` clauses is one variable
            # typed by the first (tests/unit/test_compiled_rules.py).
            return [
                self._fail(
                    ServerLoginFailed(
                        f"SCRAM pass-through for user {self.user!r} cannot work: {mismatch}",
                        hint="the auth_file verifier must be the one stored in the server's pg_authid",
                    )
                )
            ]

    def tls_established(self, certificate: bytes | None) -> None:
        """The handshake succeeded (`certificate`: the server's, DER, for channel binding)."""
        if self.state is LoginState.FAILED:  # the server sent bytes while the handshake started
            return
        self._certificate = certificate
        self.tls = True
        self._change(LoginState.AUTHENTICATING)
        self._out.append(self._startup_message())

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    def connection_lost(self, reason: str) -> ServerConnectFailed:
        """The error for a connection that ended before the login did (`reason`: the cause)."""
        if self.state is LoginState.TLS_ANSWER:
            return ServerConnectFailed(f"server closed the connection before answering SSLRequest: {reason}")
        return ServerConnectFailed(f"server closed the connection during login: {reason}")

    # ------------------------------------------------------------------ states

    def _change(self, new: LoginState) -> None:
        if new not in _NEXT[self.state]:
            raise AssertionError(f"server login: no transition from {self.state.name} to {new.name}")
        self.state = new

    def _fail(self, error: PoolerError) -> LoginFailed:
        self._change(LoginState.FAILED)
        self.error = error
        self._out.clear()
        self._scram = None
        return LoginFailed(error)

    def _startup_message(self) -> bytes:
        return codec.build_startup_message(
            {"user": self.user, "database": self.database, **dict(self.startup)}
        )

    def _tls_answer(self, data: bytes) -> list[LoginEvent]:
        if len(data) != 1:
            # Bytes after 'S' would be read as if they came through TLS; after 'N' the server
            # must wait for our StartupMessage.
            raise ProtocolViolation("server sent unencrypted data after its answer to SSLRequest")
        if data == b"S":
            self._change(LoginState.TLS_HANDSHAKE)
            return [_START_TLS]
        if self.tls_mode != "prefer":
            raise ServerConnectFailed(
                f"server {self.target} does not support SSL, but server_tls_sslmode is {self.tls_mode}"
            )
        self._change(LoginState.AUTHENTICATING)
        self._out.append(self._startup_message())
        return []

    def _messages(self, data: bytes) -> list[LoginEvent]:
        events: list[LoginEvent] = []
        messages = self._reader.feed(data)
        for index, (msg_type, body) in enumerate(messages):
            if self.state is LoginState.AUTHENTICATING:
                if msg_type == c.B_AUTHENTICATION:
                    started = self._authenticate(*codec.parse_authentication(body))
                    if started is not None:
                        events.append(started)
                    continue
            elif msg_type == c.B_PARAMETER_STATUS:
                name, value = codec.parse_parameter_status(body)
                self.parameters[name] = value
                continue
            elif msg_type == c.B_BACKEND_KEY_DATA:
                self.process_id, self.secret_key = codec.parse_backend_key_data(body)
                continue
            elif msg_type == c.B_READY_FOR_QUERY:
                if index + 1 < len(messages) or len(self._reader):
                    raise ProtocolViolation("server sent data after ReadyForQuery during login")
                self._change(LoginState.LOGGED_IN)
                self._scram = None
                events.append(_LOGGED_IN)
                return events
            if msg_type == c.B_ERROR_RESPONSE:
                fields = codec.parse_error_fields(body)
                raise ServerLoginFailed(
                    f"server login failed: {fields.get('M', 'unknown error')}",
                    detail=f"pypooler could not log in to {self.target}",
                    sqlstate=fields.get("C"),
                )
            if msg_type != c.B_NOTICE_RESPONSE:
                raise ProtocolViolation(f"unexpected message {chr(msg_type)!r} from server during login")
        return events

    # ------------------------------------------------------------------ authentication

    def _authenticate(self, code: int, payload: bytes) -> ScramStarted | None:
        if code == c.AUTH_OK:
            if self._scram is not None and not self._scram.server_verified:
                # Only SASLFinal's signature proves the server knows the verifier: a server (or
                # whatever is in between) that skips it has proved nothing. libpq refuses too.
                raise ServerAuthIncomplete(
                    f"server {self.target} ended SCRAM authentication without proving it knows"
                    " the password (AuthenticationOk before SASLFinal)",
                    hint="check that pypooler reaches the PostgreSQL server it should",
                )
            self._change(LoginState.STARTING)
            return None
        password = self.password
        if code in (c.AUTH_CLEARTEXT, c.AUTH_MD5, c.AUTH_SASL) and password is None and self.secret is None:
            raise ServerLoginFailed(
                f"server asks for a password for user {self.user!r} but none is configured",
                hint="set password in the [databases] entry or the user's secret in auth_file",
            )
        if code == c.AUTH_CLEARTEXT:
            if password is None:
                raise self._only_hashed("a cleartext password")
            self._out.append(codec.build_password_message(password.encode()))
        elif code == c.AUTH_MD5:
            if password is not None:
                hashed = md5_hash(password, self.user)
            elif isinstance(self.secret, Md5Hash):
                hashed = self.secret.hashed
            else:
                raise self._only_hashed("MD5 password authentication")
            self._out.append(codec.build_password_message(md5_response(hashed, payload[:4])))
        elif code == c.AUTH_SASL:
            return self._start_scram(codec.parse_sasl_mechanisms(payload))
        elif code == c.AUTH_SASL_CONTINUE:
            if self._scram is None:
                raise ProtocolViolation("server sent SASLContinue without SASL")
            self._out.append(codec.build_sasl_response(self._scram.server_first(payload)))
        elif code == c.AUTH_SASL_FINAL:
            if self._scram is None:
                raise ProtocolViolation("server sent SASLFinal without SASL")
            self._scram.server_final(payload)  # verifies the server's signature
        else:
            method = c.AUTH_METHOD_NAMES.get(code, f"code {code}")
            raise ServerLoginFailed(
                f"server requested authentication method {method}, which pypooler does not support",
                hint="allow md5, scram-sha-256, password or trust for pypooler in pg_hba.conf",
            )
        return None

    def _start_scram(self, mechanisms: list[str]) -> ScramStarted:
        if MECHANISM not in mechanisms:
            raise ServerLoginFailed(
                f"server offers SASL mechanisms {mechanisms}, pypooler supports {MECHANISM}"
            )
        binding = None
        if self.tls and MECHANISM_PLUS in mechanisms and self._certificate:
            binding = certificate_hash(self._certificate)
        secret = self.secret
        if self.password is not None:
            scram = ScramClientExchange(password=self.password, channel_binding=binding, tls=self.tls)
        elif isinstance(secret, ScramVerifier) and self.client_key is not None:
            scram = ScramClientExchange(
                pass_through=(secret, self.client_key), channel_binding=binding, tls=self.tls
            )
        elif isinstance(secret, ScramVerifier):
            raise ServerLoginFailed(
                f"server asks for SCRAM-SHA-256 for user {self.user!r}: pypooler has only its SCRAM"
                " verifier, and no client has logged in with SCRAM yet to pass its key through",
                hint="let clients authenticate with scram-sha-256 (or md5) first, or store the"
                " plain password in auth_file or [databases]",
            )
        else:
            raise self._only_hashed("SCRAM-SHA-256 authentication")
        self._scram = scram
        self._out.append(codec.build_sasl_initial_response(scram.mechanism, scram.client_first()))
        return ScramStarted(scram.mechanism, pass_through=self.password is None)

    def _only_hashed(self, what: str) -> ServerLoginFailed:
        kind = "an MD5 hash" if isinstance(self.secret, Md5Hash) else "a SCRAM verifier"
        return ServerLoginFailed(
            f"server asks for {what} for user {self.user!r}, but pypooler knows only {kind} of its"
            " password, which cannot answer that",
            hint="store the plain password in auth_file or [databases], or change the server's"
            " pg_hba.conf method to match the stored secret",
        )
