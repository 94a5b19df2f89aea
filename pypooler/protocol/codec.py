"""Sans-IO codec for PostgreSQL protocol 3.0: framing, parsers and builders.

Rules kept here:
- No sockets, no asyncio, no clocks: bytes in, values or bytes out, so every function is unit-testable
  and fuzzable.
- Every malformed input raises `ProtocolViolation` (or `UnsupportedProtocol`), never IndexError,
  struct.error or UnicodeDecodeError, so a caller can turn any bad input into one clear ErrorResponse.
- Structs are compiled once at import and their bound methods reused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from pypooler.protocol import constants as c
from pypooler.protocol.errors import InvalidStartupPacket, ProtocolViolation, UnsupportedProtocol

HEADER: Final = struct.Struct("!BI")  # type byte, Int32 length (counts itself, not the type byte)
INT32: Final = struct.Struct("!i")
UINT32: Final = struct.Struct("!I")
INT16: Final = struct.Struct("!h")
TWO_INT32: Final = struct.Struct("!ii")
STARTUP_HEADER: Final = struct.Struct("!Ii")  # length, protocol version / request code

unpack_header = HEADER.unpack_from
pack_header = HEADER.pack

# Whether this module runs compiled (setup.py's mypyc build). The forwarding loops then read a
# message header by indexing bytes, which compiles to C arithmetic and costs about an eighth of
# unpack_header; from the sources, unpack_header is the cheaper of the two. Each `if NATIVE:`
# keeps the form that is cheaper in each build: `python -m bench.native_paths`, bench/README.md.
NATIVE: Final = not __file__.endswith(".py")

# Hard ceiling for a message pypooler itself must buffer whole (login and console traffic), so a
# hostile peer cannot make us allocate a huge buffer before saying anything. Forwarded traffic
# is never buffered whole and has no such limit.
MAX_BUFFERED_MESSAGE: Final = 1 << 20


# --------------------------------------------------------------------------- startup packets


class StartupMessage:
    """Protocol version and parameters of a StartupMessage.

    A plain class rather than a dataclass: compiled (setup.py), a dataclass keeps the interpreted
    __init__ that the dataclasses module generates, and one is built per login.
    """

    __slots__ = ("parameters", "protocol_version", "raw")

    def __init__(
        self, protocol_version: int, parameters: dict[str, str] | None = None, raw: bytes = b""
    ) -> None:
        self.protocol_version = protocol_version
        self.parameters: dict[str, str] = {} if parameters is None else parameters
        # The packet as received: equal packets mean equal logins (a cache key; not compared).
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StartupMessage):
            return NotImplemented
        return self.protocol_version == other.protocol_version and self.parameters == other.parameters

    def __repr__(self) -> str:
        return f"StartupMessage(protocol_version={self.protocol_version}, parameters={self.parameters!r})"

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        # PostgreSQL defaults the database to the user name.
        return self.parameters.get("database") or self.user


@dataclass(slots=True, frozen=True)
class SSLRequest:
    pass


@dataclass(slots=True, frozen=True)
class GSSENCRequest:
    pass


@dataclass(slots=True, frozen=True)
class CancelRequest:
    process_id: int
    secret_key: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest
# The requests without fields, built once (a dataclass's __init__ is interpreted even compiled).
_SSL_REQUEST: Final = SSLRequest()
_GSSENC_REQUEST: Final = GSSENCRequest()


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Parse one whole startup-phase packet (its length word included)."""
    if len(packet) < 8:
        raise ProtocolViolation("invalid startup packet layout: too short")
    length, code = STARTUP_HEADER.unpack_from(packet)
    if length != len(packet):
        raise ProtocolViolation("invalid startup packet layout: length mismatch")
    if code == c.SSL_REQUEST_CODE:
        return _SSL_REQUEST
    if code == c.GSSENC_REQUEST_CODE:
        return _GSSENC_REQUEST
    if code == c.CANCEL_REQUEST_CODE:
        if length != 16:
            raise ProtocolViolation("invalid cancel request length")
        pid, key = TWO_INT32.unpack_from(packet, 8)
        return CancelRequest(pid, key)
    major = (code & 0xFFFFFFFF) >> 16  # the header is read signed; a version is two unsigned halves
    if major != 3:
        minor = code & 0xFFFF
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0",
            hint="pypooler speaks protocol 3.0 only (PostgreSQL 7.4 and later clients).",
        )
    return StartupMessage(code, _parse_startup_parameters(packet, 8), packet)


def _parse_startup_parameters(packet: bytes, pos: int) -> dict[str, str]:
    """name, NUL, value, NUL, ... then one more NUL. A well-formed list is split in C; anything
    else goes through the loop, which names what is wrong."""
    if len(packet) > pos and packet[-1] == 0:
        try:
            parts = packet[pos:-1].decode("utf-8").split("\0")
        except UnicodeDecodeError:
            parts = []
        # name, value, ..., "" (the list's terminator); no name empty.
        count = len(parts) - 1
        if count >= 0 and not count % 2 and parts[count] == "":
            parameters: dict[str, str] = {}
            for i in range(0, count, 2):
                name = parts[i]
                if not name:
                    break
                parameters[name] = parts[i + 1]
            else:
                return parameters
    return _parse_startup_parameters_exactly(packet, pos)


def _parse_startup_parameters_exactly(packet: bytes, pos: int) -> dict[str, str]:
    parameters: dict[str, str] = {}
    end = len(packet)
    while True:
        if pos >= end:
            raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
        name_end = packet.find(b"\0", pos)
        if name_end < 0:
            raise ProtocolViolation("invalid startup packet layout: unterminated parameter name")
        if name_end == pos:  # the empty name that ends the list
            if name_end != end - 1:
                raise ProtocolViolation("invalid startup packet layout: data after terminator")
            return parameters
        value_end = packet.find(b"\0", name_end + 1)
        if value_end < 0:
            raise ProtocolViolation("invalid startup packet layout: unterminated parameter value")
        name = _decode(packet[pos:name_end], "startup parameter name")
        parameters[name] = _decode(packet[name_end + 1 : value_end], f"startup parameter {name!r}")
        pos = value_end + 1


# PostgreSQL's bound counts the packet without its length word.
_MAX_STARTUP_TOTAL: Final = c.MAX_STARTUP_PACKET + 4


class StartupPacketReader:
    """Collects the length-prefixed, untyped packets of the startup phase from a byte stream."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> StartupPacket | None:
        """Add bytes; return the next complete packet, or None if more bytes are needed.

        A length word PostgreSQL would not take (the total outside 8..MAX_STARTUP_PACKET + 4)
        raises InvalidStartupPacket: such bytes are not a startup packet at all (a Terminate
        sent first, an HTTP request), and PostgreSQL only logs them. Call `take_rest()` after a
        packet to get the bytes that followed it.
        """
        if not self._buffer and len(data) >= 8:
            # The usual read: exactly one packet, parsed as it came (no copy through the buffer).
            (length,) = UINT32.unpack_from(data)
            if length == len(data) and length <= _MAX_STARTUP_TOTAL:
                return parse_startup_packet(data)
        self._buffer += data
        if len(self._buffer) < 4:
            return None
        (length,) = UINT32.unpack_from(self._buffer)
        if length < 8 or length > _MAX_STARTUP_TOTAL:
            raise InvalidStartupPacket(
                f"invalid length of startup packet: {length} bytes (must be 8..{_MAX_STARTUP_TOTAL})"
            )
        if len(self._buffer) < length:
            return None
        packet = bytes(self._buffer[:length])
        del self._buffer[:length]
        return parse_startup_packet(packet)

    def __len__(self) -> int:
        """Bytes of an incomplete packet held (at EOF: PostgreSQL's "incomplete startup packet")."""
        return len(self._buffer)

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


# --------------------------------------------------------------------------- typed messages


class MessageReader:
    """Splits a byte stream into whole (type, body) messages, for traffic pypooler consumes itself.

    Used only off the hot path (server login, client authentication, admin console); forwarded
    traffic goes through `protocol.transaction` instead and is never buffered whole. The read
    position only moves forward, and consumed bytes are dropped in one slice per `feed`, so a peer
    dribbling bytes one at a time costs linear, not quadratic, work.
    """

    __slots__ = ("_buffer", "max_message")

    def __init__(self, max_message: int = MAX_BUFFERED_MESSAGE) -> None:
        self._buffer = bytearray()
        self.max_message = max_message

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buffer
        buf += data
        messages: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 5:
            msg_type, length = unpack_header(buf, pos)
            if length < 4:
                raise ProtocolViolation(f"invalid message length {length}")
            if length > self.max_message:
                raise ProtocolViolation(
                    f"message of {length} bytes is over the {self.max_message}-byte limit"
                )
            if end - pos < 1 + length:
                break
            messages.append((msg_type, bytes(buf[pos + 5 : pos + 1 + length])))
            pos += 1 + length
        if pos:
            del buf[:pos]
        return messages

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def __len__(self) -> int:
        return len(self._buffer)


# --------------------------------------------------------------------------- parsers


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"invalid UTF-8 in {what}") from None


def read_cstring(body: bytes, pos: int, what: str = "string") -> tuple[str, int]:
    """Read a NUL-terminated string at `pos`; return it and the position after the NUL."""
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation(f"unterminated {what}")
    return _decode(body[pos:end], what), end + 1


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.find(b"\0", pos + 1)
        if end < 0:
            raise ProtocolViolation("unterminated field in error response")
        fields[code] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body, 0, "parameter name")
    value, _ = read_cstring(body, pos, "parameter value")
    return name, value


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolViolation("invalid BackendKeyData length")
    pid, key = TWO_INT32.unpack(body)
    return pid, key


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """Split an Authentication* message body into its request code and payload."""
    if len(body) < 4:
        raise ProtocolViolation("invalid authentication request")
    (code,) = INT32.unpack_from(body)
    return code, body[4:]


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    return [m.decode("ascii", "replace") for m in payload.split(b"\0") if m]


def parse_data_row(body: bytes) -> list[bytes | None]:
    """The column values of a DataRow (None for SQL NULL)."""
    if len(body) < 2:
        raise ProtocolViolation("invalid DataRow")
    (count,) = INT16.unpack_from(body)
    values: list[bytes | None] = []
    pos = 2
    for _ in range(count):
        if len(body) - pos < 4:
            raise ProtocolViolation("invalid DataRow: truncated")
        (length,) = INT32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        if len(body) - pos < length:
            raise ProtocolViolation("invalid DataRow: truncated")
        values.append(body[pos : pos + length])
        pos += length
    return values


ROW_DESCRIPTION_FIELD: Final = struct.Struct("!ihihih")  # table, column, type, size, modifier, format


def parse_row_description(body: bytes) -> list[tuple[str, int, int, int, int, int, int]]:
    """RowDescription: (name, table oid, column number, type oid, type size, type modifier,
    format code) per column."""
    try:
        (count,) = INT16.unpack_from(body, 0)
        pos = 2
        columns: list[tuple[str, int, int, int, int, int, int]] = []
        for _ in range(count):
            name, pos = read_cstring(body, pos, "column name")
            table, column, oid, size, modifier, form = ROW_DESCRIPTION_FIELD.unpack_from(body, pos)
            columns.append((name, table, column, oid, size, modifier, form))
            pos += ROW_DESCRIPTION_FIELD.size
    except struct.error:
        raise ProtocolViolation("invalid RowDescription message") from None
    return columns


def parse_password_message(body: bytes) -> bytes:
    """The password of a PasswordMessage (cleartext or md5 response), without its NUL."""
    end = body.find(b"\0")
    if end < 0 or end != len(body) - 1:
        raise ProtocolViolation("invalid password packet layout")
    return body[:end]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: the selected mechanism and its initial data (empty when absent)."""
    mechanism, pos = read_cstring(body, 0, "SASL mechanism name")
    if len(body) - pos < 4:
        raise ProtocolViolation("invalid SASLInitialResponse: no data length")
    (length,) = INT32.unpack_from(body, pos)
    pos += 4
    if length == -1:
        length = 0
    if length < 0 or length != len(body) - pos:
        raise ProtocolViolation("invalid SASLInitialResponse: data length does not match")
    return mechanism, body[pos:]


# --------------------------------------------------------------------------- builders


def build_message(msg_type: int, body: bytes = b"") -> bytes:
    return pack_header(msg_type, len(body) + 4) + body


def _cstring(text: str) -> bytes:
    return text.encode("utf-8").replace(b"\0", b"") + b"\0"


def build_parameter_status(name: str, value: str) -> bytes:
    return build_message(c.B_PARAMETER_STATUS, _cstring(name) + _cstring(value))


def build_parameter_statuses(parameters: Mapping[str, str]) -> bytes:
    return b"".join(build_parameter_status(k, v) for k, v in parameters.items())


def build_backend_key_data(process_id: int, secret_key: int) -> bytes:
    return build_message(c.B_BACKEND_KEY_DATA, TWO_INT32.pack(process_id, secret_key))


READY_FOR_QUERY_IDLE: Final = build_message(c.B_READY_FOR_QUERY, b"I")


def build_negotiate_protocol_version(newest_minor: int, unrecognized: Iterable[str]) -> bytes:
    """NegotiateProtocolVersion: the newest 3.x we speak and the `_pq_.` options we ignored."""
    names = list(unrecognized)
    body = INT32.pack(newest_minor) + INT32.pack(len(names)) + b"".join(_cstring(n) for n in names)
    return build_message(c.B_NEGOTIATE_PROTOCOL_VERSION, body)


def build_ready_for_query(status: int = c.TX_IDLE) -> bytes:
    return build_message(c.B_READY_FOR_QUERY, bytes((status,)))


def build_authentication(code: int, payload: bytes = b"") -> bytes:
    return build_message(c.B_AUTHENTICATION, INT32.pack(code) + payload)


AUTHENTICATION_OK: Final = build_authentication(c.AUTH_OK)
AUTHENTICATION_CLEARTEXT_PASSWORD: Final = build_authentication(c.AUTH_CLEARTEXT)


def build_authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    return build_authentication(c.AUTH_SASL, b"".join(_cstring(m) for m in mechanisms) + b"\0")


def build_startup_message(parameters: Mapping[str, str]) -> bytes:
    body = STARTUP_HEADER.pack(0, c.PROTOCOL_3_0)[4:]
    body += b"".join(_cstring(k) + _cstring(v) for k, v in parameters.items()) + b"\0"
    return UINT32.pack(len(body) + 4) + body


def build_cancel_request(process_id: int, secret_key: int) -> bytes:
    return UINT32.pack(16) + INT32.pack(c.CANCEL_REQUEST_CODE) + TWO_INT32.pack(process_id, secret_key)


def build_ssl_request() -> bytes:
    return STARTUP_HEADER.pack(8, c.SSL_REQUEST_CODE)


def build_password_message(password: bytes) -> bytes:
    return build_message(c.F_PASSWORD, password + b"\0")


def build_sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return build_message(c.F_PASSWORD, _cstring(mechanism) + INT32.pack(len(data)) + data)


def build_sasl_response(data: bytes) -> bytes:
    return build_message(c.F_PASSWORD, data)


TERMINATE: Final = build_message(c.F_TERMINATE)
SYNC: Final = build_message(c.F_SYNC)


def build_query(sql: str) -> bytes:
    return build_message(c.F_QUERY, _cstring(sql))


PARSE_COMPLETE: Final = build_message(c.B_PARSE_COMPLETE)
CLOSE_COMPLETE: Final = build_message(c.B_CLOSE_COMPLETE)


def build_parse(name: bytes, rest: bytes) -> bytes:
    """Parse of statement `name`; `rest` is the body after the name (query text, parameter types)."""
    return build_message(c.F_PARSE, name + b"\0" + rest)


def build_close_statement(name: bytes) -> bytes:
    return build_message(c.F_CLOSE, b"S" + name + b"\0")


def build_describe_statement(name: bytes) -> bytes:
    return build_message(c.F_DESCRIBE, b"S" + name + b"\0")


def build_parameterized_query(sql: str, parameters: Iterable[str | None]) -> bytes:
    """Parse, Bind, Execute and Sync of one unnamed statement with text parameters: how pypooler
    runs a query of its own (auth_query) without ever splicing values into SQL."""
    return build_bound_statement(sql, parameters) + SYNC


def build_bound_statement(sql: str, parameters: Iterable[str | None], *, describe: bool = False) -> bytes:
    """Parse, Bind (text parameters, text results), optionally Describe of the portal (for its
    RowDescription or NoData), and Execute of one unnamed statement, without Sync: pipelined
    statements up to one Sync run as one implicit transaction."""
    values = list(parameters)
    parse = build_message(c.F_PARSE, b"\0" + _cstring(sql) + INT16.pack(0))
    bind_values = b"".join(
        INT32.pack(-1) if value is None else INT32.pack(len(raw := value.encode())) + raw for value in values
    )
    bind = build_message(
        c.F_BIND,
        b"\0\0" + INT16.pack(0) + INT16.pack(len(values)) + bind_values + INT16.pack(0),
    )
    return parse + bind + (DESCRIBE_PORTAL if describe else b"") + EXECUTE_UNNAMED


DESCRIBE_PORTAL: Final = build_message(c.F_DESCRIBE, b"P\0")
EXECUTE_UNNAMED: Final = build_message(c.F_EXECUTE, b"\0" + INT32.pack(0))  # every row


def build_command_complete(tag: str) -> bytes:
    return build_message(c.B_COMMAND_COMPLETE, _cstring(tag))


def build_row_description(columns: Iterable[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    cols = list(columns)
    body = INT16.pack(len(cols)) + b"".join(
        _cstring(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0) for name, oid in cols
    )
    return build_message(c.B_ROW_DESCRIPTION, body)


def build_data_row(values: Iterable[str | None]) -> bytes:
    parts = []
    count = 0
    for value in values:
        count += 1
        if value is None:
            parts.append(INT32.pack(-1))
        else:
            raw = value.encode("utf-8")
            parts.append(INT32.pack(len(raw)) + raw)
    return build_message(c.B_DATA_ROW, INT16.pack(count) + b"".join(parts))
