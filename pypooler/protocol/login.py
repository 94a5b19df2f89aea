"""The client's login as a sans-IO state machine: startup packets, TLS, authentication, welcome.

`ClientLogin` takes the bytes a client sends before its session is ready (`receive_data`) and
answers with bytes to send (`data_to_send`) and at most one event per call, at which it stops
reading until the adapter (client.py) has acted:

- `START_TLS`: an SSLRequest was answered 'S'; the adapter upgrades the transport and calls
  `tls_started()` (an SSLRequest without client TLS, or a GSSENCRequest, is answered 'N' here);
- `codec.CancelRequest`: the adapter routes it and closes;
- `codec.StartupMessage`: the adapter checks it (limits, database, hba, TLS required), then
  calls `accept()`, looks up the user's secret (auth_file, auth_query: I/O stays outside) and
  calls `authenticate(exchange)`;
- `AUTHENTICATED`: the exchange is done; the adapter builds the welcome with `welcome(...)`
  (or hands the connection to the admin console with `hand_over()`);
- `CLIENT_TERMINATED`: the client sent Terminate while authenticating (psql going to ask the
  user for a password): the adapter closes without a word.

Rules kept here:
- No sockets, no clock, no asyncio; nothing from client.py, pool.py or config.py: settings
  arrive as plain values, the authentication as an object with `start`/`receive`/`done`
  (auth.ClientAuthExchange).
- Every protocol violation raises the `PoolerError` to send (protocol/errors.py): a startup
  packet over the 10,000-byte limit, in one read or split, is 08P01; bytes that are no startup
  packet at all raise the silent InvalidStartupPacket.
- Whatever the client pipelines while the adapter works (after its startup packet, after its
  last authentication message) is held in order and given back with the welcome, up to
  HELD_LIMIT bytes.
- The state changes only through `_set_state`, which checks `TRANSITIONS`.
"""

from __future__ import annotations

import enum
from typing import Final, Generic, Protocol, TypeVar

from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import ProtocolViolation

# Bytes a client may send before it is answered (here: before the welcome) before it is refused.
HELD_LIMIT: Final = 256 * 1024
# Largest client message accepted while authenticating: a SCRAM message is ~200 bytes, a password
# rarely 100; anything bigger is an attack or a broken client.
AUTH_MESSAGE_LIMIT: Final = 8192


class LoginState(enum.IntEnum):
    STARTUP = 1  # reading startup packets (SSLRequest, GSSENCRequest, ...)
    TLS_HANDSHAKE = 2  # 'S' sent; the adapter runs the handshake
    CHECKING = 3  # StartupMessage read; the adapter decides whether to go on
    ACCEPTED = 4  # allowed in; the adapter finds the user's secret
    AUTHENTICATING = 5  # the exchange runs on the client's messages
    AUTHENTICATED = 6  # the adapter prepares the welcome
    DONE = 7  # welcomed, or handed to the admin console
    ENDED = 8  # a cancel request, a Terminate, or a protocol violation


_S = LoginState
TRANSITIONS: Final[dict[LoginState, frozenset[LoginState]]] = {
    _S.STARTUP: frozenset({_S.TLS_HANDSHAKE, _S.CHECKING, _S.ENDED}),
    _S.TLS_HANDSHAKE: frozenset({_S.STARTUP, _S.ENDED}),
    _S.CHECKING: frozenset({_S.ACCEPTED, _S.ENDED}),
    # Trust logins skip the exchange.
    _S.ACCEPTED: frozenset({_S.AUTHENTICATING, _S.AUTHENTICATED, _S.ENDED}),
    _S.AUTHENTICATING: frozenset({_S.AUTHENTICATED, _S.ENDED}),
    _S.AUTHENTICATED: frozenset({_S.DONE, _S.ENDED}),
    _S.DONE: frozenset(),
    _S.ENDED: frozenset(),
}
# States in which the client's bytes are held for later, not parsed.
_HOLDING: Final = frozenset({_S.TLS_HANDSHAKE, _S.CHECKING, _S.ACCEPTED, _S.AUTHENTICATED})


class AuthExchange(Protocol):
    """What the machine needs of an authentication (auth.ClientAuthExchange)."""

    @property
    def done(self) -> bool: ...

    def start(self) -> bytes: ...

    def receive(self, msg_type: int, body: bytes) -> bytes: ...


ExchangeT = TypeVar("ExchangeT", bound=AuthExchange)


class _Event:
    """An event without fields; one instance each."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


START_TLS: Final = _Event("START_TLS")
AUTHENTICATED: Final = _Event("AUTHENTICATED")
CLIENT_TERMINATED: Final = _Event("CLIENT_TERMINATED")

LoginEvent = _Event | codec.CancelRequest | codec.StartupMessage


def build_welcome(statuses: bytes, process_id: int, secret_key: int) -> bytes:
    """The end of a login: `statuses` (AuthenticationOk and the ParameterStatus set), our own
    BackendKeyData, ReadyForQuery idle."""
    return statuses + codec.build_backend_key_data(process_id, secret_key) + codec.READY_FOR_QUERY_IDLE


class ClientLogin(Generic[ExchangeT]):
    """One client's login; see the module docstring."""

    __slots__ = (
        "_auth_reader",
        "_held",
        "_output",
        "_startup_reader",
        "exchange",
        "startup",
        "state",
        "tls",
        "tls_available",
    )

    def __init__(self, *, tls_available: bool) -> None:
        self.state = LoginState.STARTUP
        self.tls_available = tls_available  # an SSLRequest is answered 'S' (else 'N')
        self.tls = False  # the transport is TLS now
        self._output: list[bytes] = []
        self._startup_reader: codec.StartupPacketReader | None = codec.StartupPacketReader()
        self._auth_reader: codec.MessageReader | None = None
        self._held = b""  # bytes received while the adapter works (see _HOLDING)
        self.startup: codec.StartupMessage | None = None
        self.exchange: ExchangeT | None = None

    # ------------------------------------------------------------------ state

    def _set_state(self, new: LoginState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"client login: {self.state.name} -> {new.name} is not a transition")
        self.state = new

    @property
    def in_tls_handshake(self) -> bool:
        """Between our 'S' and the end of the handshake: nothing can be said in clear."""
        return self.state is LoginState.TLS_HANDSHAKE

    def incomplete_startup_bytes(self) -> int:
        """Bytes of a startup packet not complete yet (at EOF: PostgreSQL's "incomplete startup
        packet")."""
        reader = self._startup_reader
        return len(reader) if reader is not None else 0

    def data_to_send(self) -> bytes:
        output = self._output
        if not output:
            return b""
        data = output[0] if len(output) == 1 else b"".join(output)
        output.clear()
        return data

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> LoginEvent | None:
        """Take bytes from the client; the event the adapter must act on, if any. Raises the
        PoolerError to send (and ends the login) on a protocol violation."""
        state = self.state
        try:
            if state is LoginState.STARTUP:
                return self._startup_data(data)
            if state is LoginState.AUTHENTICATING:
                return self._auth_data(data)
            if state in _HOLDING:
                if len(self._held) + len(data) > HELD_LIMIT:
                    raise ProtocolViolation("too much data sent before the login completed")
                self._held += data
        except BaseException:
            self.state = LoginState.ENDED
            raise
        return None  # DONE, ENDED: nothing more is read here

    def _startup_data(self, data: bytes) -> LoginEvent | None:
        reader = self._startup_reader
        assert reader is not None
        while True:
            packet = reader.feed(data)
            if packet is None:
                return None
            data = reader.take_rest()
            if isinstance(packet, codec.SSLRequest):
                if not self.tls_available:
                    self._output.append(b"N")  # no TLS here: the client goes on in clear (or gives up)
                    continue
                if self.tls:
                    raise ProtocolViolation("SSLRequest received on a connection that is already TLS")
                if data:
                    # Bytes sent before our answer would be taken as if they came through TLS.
                    raise ProtocolViolation("received unencrypted data after SSL request")
                self._output.append(b"S")
                self._set_state(LoginState.TLS_HANDSHAKE)
                return START_TLS
            if isinstance(packet, codec.GSSENCRequest):
                self._output.append(b"N")  # no GSS encryption: the client goes on in clear (or TLS)
                continue
            if isinstance(packet, codec.CancelRequest):
                self._set_state(LoginState.ENDED)
                return packet
            self._startup_reader = None
            self._held = data
            self.startup = packet
            self._set_state(LoginState.CHECKING)
            return packet

    def tls_started(self) -> LoginEvent | None:
        """The TLS handshake is done: read on (decrypted bytes the loop passed on before the
        adapter heard of the handshake's end were held)."""
        self._set_state(LoginState.STARTUP)
        self.tls = True
        held, self._held = self._held, b""
        return self.receive_data(held) if held else None

    # ------------------------------------------------------------------ authentication

    def accept(self) -> None:
        """The adapter lets the StartupMessage in. A newer 3.x client is told we speak 3.0 and
        ignored its protocol options (PostgreSQL's NegotiateProtocolVersion)."""
        self._set_state(LoginState.ACCEPTED)
        startup = self.startup
        assert startup is not None
        options = [name for name in startup.parameters if name.startswith("_pq_.")]
        if startup.protocol_version != c.PROTOCOL_3_0 or options:
            self._output.append(codec.build_negotiate_protocol_version(0, options))

    def authenticate(self, exchange: ExchangeT | None) -> LoginEvent | None:
        """Start `exchange` (None: trust, nothing to exchange) on what the client sent so far;
        AUTHENTICATED if that is already enough."""
        self.exchange = exchange
        if exchange is None:
            self._set_state(LoginState.AUTHENTICATED)
            return AUTHENTICATED
        request = exchange.start()
        if exchange.done:  # a method that asks for nothing (cert)
            self._set_state(LoginState.AUTHENTICATED)
            return AUTHENTICATED
        self._set_state(LoginState.AUTHENTICATING)
        self._auth_reader = codec.MessageReader(max_message=AUTH_MESSAGE_LIMIT)
        self._output.append(request)
        held, self._held = self._held, b""
        return self.receive_data(held) if held else None

    def _auth_data(self, data: bytes) -> LoginEvent | None:
        exchange = self.exchange
        reader = self._auth_reader
        assert exchange is not None and reader is not None
        messages = reader.feed(data)
        for index, (msg_type, body) in enumerate(messages):
            if msg_type == c.F_TERMINATE:  # e.g. psql going to ask the user for a password
                self._set_state(LoginState.ENDED)
                return CLIENT_TERMINATED
            reply = exchange.receive(msg_type, body)
            if reply:
                self._output.append(reply)  # the last one (SASLFinal) goes out with the welcome
            if exchange.done:
                # Whatever the client pipelined after its last message waits for the welcome,
                # in the order it was sent.
                after = b"".join(codec.build_message(t, b) for t, b in messages[index + 1 :])
                self._held = after + reader.take_rest()
                self._auth_reader = None
                self._set_state(LoginState.AUTHENTICATED)
                return AUTHENTICATED
        return None

    # ------------------------------------------------------------------ the end

    def welcome(self, statuses: bytes, process_id: int, secret_key: int) -> tuple[bytes, bytes]:
        """The login's last write (what is still unsent, then the welcome: see build_welcome),
        and the bytes the client pipelined meanwhile, for the session."""
        self._set_state(LoginState.DONE)
        out = self.data_to_send() + build_welcome(statuses, process_id, secret_key)
        held, self._held = self._held, b""
        return out, held

    def hand_over(self) -> tuple[bytes, bytes]:
        """The admin console takes the connection over: what is still unsent, and the bytes the
        client pipelined meanwhile."""
        self._set_state(LoginState.DONE)
        held, self._held = self._held, b""
        return self.data_to_send(), held
