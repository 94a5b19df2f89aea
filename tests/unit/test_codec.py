"""Tests for pypooler.protocol.codec: builders round-trip through the parsers, the startup and
message readers survive any split of their input, and no input raises anything but
ProtocolViolation.
"""

from __future__ import annotations

import contextlib
import functools
import re
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypooler.protocol import codec, errors
from pypooler.protocol import constants as c
from pypooler.protocol.codec import (
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
    StartupPacketReader,
)
from pypooler.protocol.errors import InvalidStartupPacket, PoolerError, ProtocolViolation, UnsupportedProtocol
from tests.support.messages import cut_at, startup_packet

# Enough examples to find framing mistakes, few enough that the module runs in about a second.
FUZZ = settings(max_examples=150, deadline=None)

INT32_RANGE = st.integers(-(2**31), 2**31 - 1)
# Text without NUL: the wire format cannot carry one inside a C string.
WIRE_TEXT = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]))


def body_of(message: bytes) -> tuple[int, bytes]:
    """Split one whole typed message into (type, body), checking its length word."""
    msg_type, length = codec.unpack_header(message)
    assert length == len(message) - 1
    return msg_type, message[5:]


def splits(data: bytes) -> Iterator[list[bytes]]:
    """`data` cut in two at every position (empty halves included), then one byte at a time."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


GSSENC_REQUEST = startup_packet(c.GSSENC_REQUEST_CODE)


# --------------------------------------------------------------------------- builders -> parsers


@pytest.mark.parametrize("detail", [None, "", "the detail"])
@pytest.mark.parametrize("hint", [None, "", "the hint"])
def test_error_response_round_trip(detail: str | None, hint: str | None) -> None:
    message = errors.build_error_response("ERROR", "42P01", "no such table", detail=detail, hint=hint)

    msg_type, body = body_of(message)
    fields = codec.parse_error_fields(body)

    assert msg_type == c.B_ERROR_RESPONSE
    assert body.endswith(b"\0\0")
    expected = {"S": "ERROR", "V": "ERROR", "C": "42P01", "M": "no such table"}
    if detail:
        expected["D"] = detail
    if hint:
        expected["H"] = hint
    assert fields == expected


def test_notice_response_round_trip() -> None:
    msg_type, body = body_of(errors.build_notice_response("hello", detail="more"))

    assert msg_type == c.B_NOTICE_RESPONSE
    assert codec.parse_error_fields(body) == {
        "S": "NOTICE",
        "V": "NOTICE",
        "C": "00000",
        "M": "hello",
        "D": "more",
    }


def test_error_response_drops_nul_from_text() -> None:
    # A NUL would end the field early and shift every field after it.
    _, body = body_of(errors.build_error_response("ERROR", "XX000", "a\0b", hint="c\0d"))

    assert codec.parse_error_fields(body) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "XX000",
        "M": "ab",
        "H": "cd",
    }


@FUZZ
@given(message=WIRE_TEXT, detail=st.none() | WIRE_TEXT, hint=st.none() | WIRE_TEXT)
def test_error_response_round_trips_any_text(message: str, detail: str | None, hint: str | None) -> None:
    _, body = body_of(errors.build_error_response("FATAL", "08P01", message, detail=detail, hint=hint))
    fields = codec.parse_error_fields(body)

    assert fields["M"] == message
    assert fields.get("D") == (detail or None)
    assert fields.get("H") == (hint or None)


def all_error_classes() -> list[type[PoolerError]]:
    found: list[type[PoolerError]] = []
    pending: list[type[PoolerError]] = [PoolerError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda cls: cls.__name__)
def test_pooler_error_response_carries_class_sqlstate(cls: type[PoolerError]) -> None:
    error = cls("it went wrong", detail="why", hint="what to do")

    msg_type, body = body_of(error.to_error_response())
    fields = codec.parse_error_fields(body)

    assert msg_type == c.B_ERROR_RESPONSE
    assert fields == {
        "S": cls.severity,
        "V": cls.severity,
        "C": cls.sqlstate,
        "M": "it went wrong",
        "D": "why",
        "H": "what to do",
    }


@pytest.mark.parametrize(
    ("cls", "sqlstate"),
    [
        (errors.PoolerError, "XX000"),
        (errors.ProtocolViolation, "08P01"),
        # Deliberately not PostgreSQL's 0A000: every unusable startup packet reports 08P01.
        (errors.UnsupportedProtocol, "08P01"),
        (errors.NoSuchDatabase, "3D000"),
        (errors.TooManyClients, "53300"),
        (errors.QueryWaitTimeout, "08006"),
        (errors.ServerConnectFailed, "08001"),
        (errors.ServerLoginFailed, "28000"),
        (errors.ServerConnectionLost, "08006"),
        (errors.StatementModeTransaction, "25001"),
        (errors.ShuttingDown, "57P01"),
        (errors.PasswordAuthFailed, "28P01"),
        (errors.AuthRejected, "28000"),
        (errors.ChannelBindingError, "28000"),
        (errors.ClientLoginTimeout, "57014"),
        (errors.AuthLookupFailed, "08001"),
    ],
)
def test_pooler_errors_are_fatal_with_their_sqlstate(cls: type[PoolerError], sqlstate: str) -> None:
    fields = codec.parse_error_fields(body_of(cls("x").to_error_response())[1])

    assert (fields["S"], fields["V"], fields["C"]) == ("FATAL", "FATAL", sqlstate)


def test_server_login_failed_reports_the_servers_sqlstate() -> None:
    error = errors.ServerLoginFailed("password authentication failed", sqlstate="28P01")

    fields = codec.parse_error_fields(body_of(error.to_error_response())[1])

    assert fields["C"] == "28P01"
    assert errors.ServerLoginFailed.sqlstate == "28000"  # the class default is untouched


def test_unsupported_protocol_is_a_protocol_violation() -> None:
    assert issubclass(UnsupportedProtocol, ProtocolViolation)
    assert UnsupportedProtocol.sqlstate == ProtocolViolation.sqlstate
    assert UnsupportedProtocol.reason != ProtocolViolation.reason


@pytest.mark.parametrize(
    ("name", "value"), [("server_version", "16.2"), ("TimeZone", ""), ("application_name", "naïve ☃")]
)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    msg_type, body = body_of(codec.build_parameter_status(name, value))

    assert msg_type == c.B_PARAMETER_STATUS
    assert codec.parse_parameter_status(body) == (name, value)


def test_parameter_statuses_are_concatenated_in_order() -> None:
    parameters = {"a": "1", "b": "2", "c": "3"}

    messages = MessageReader().feed(codec.build_parameter_statuses(parameters))

    assert [codec.parse_parameter_status(body) for _, body in messages] == list(parameters.items())


@FUZZ
@given(process_id=INT32_RANGE, secret_key=INT32_RANGE)
def test_backend_key_data_round_trip(process_id: int, secret_key: int) -> None:
    msg_type, body = body_of(codec.build_backend_key_data(process_id, secret_key))

    assert msg_type == c.B_BACKEND_KEY_DATA
    assert codec.parse_backend_key_data(body) == (process_id, secret_key)


@pytest.mark.parametrize("body", [b"", b"1234567", b"123456789"])
def test_backend_key_data_of_wrong_length(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        codec.parse_backend_key_data(body)


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (c.AUTH_OK, b""),
        (c.AUTH_CLEARTEXT, b""),
        (c.AUTH_MD5, b"salt"),
        (c.AUTH_SASL, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0"),
        (c.AUTH_SASL_CONTINUE, b"r=nonce,s=c2FsdA==,i=4096"),
        (c.AUTH_SASL_FINAL, b"v=proof"),
    ],
)
def test_authentication_round_trip(code: int, payload: bytes) -> None:
    msg_type, body = body_of(codec.build_authentication(code, payload))

    assert msg_type == c.B_AUTHENTICATION
    assert codec.parse_authentication(body) == (code, payload)


def test_authentication_ok_constant() -> None:
    assert codec.parse_authentication(body_of(codec.AUTHENTICATION_OK)[1]) == (c.AUTH_OK, b"")


def test_sasl_mechanisms() -> None:
    _, payload = codec.parse_authentication(
        body_of(codec.build_authentication(c.AUTH_SASL, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0"))[1]
    )

    assert codec.parse_sasl_mechanisms(payload) == ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]


@pytest.mark.parametrize("body", [b"", b"\0\0\0"])
def test_authentication_too_short(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        codec.parse_authentication(body)


def test_ready_for_query_builders() -> None:
    assert codec.READY_FOR_QUERY_IDLE == b"Z\0\0\0\x05I"
    assert codec.build_ready_for_query(c.TX_IN_TRANSACTION) == b"Z\0\0\0\x05T"
    assert codec.build_ready_for_query(c.TX_FAILED) == b"Z\0\0\0\x05E"


def test_fixed_frontend_messages() -> None:
    assert codec.TERMINATE == b"X\0\0\0\x04"
    assert codec.SYNC == b"S\0\0\0\x04"
    assert body_of(codec.build_query("SELECT 1")) == (c.F_QUERY, b"SELECT 1\0")
    assert body_of(codec.build_password_message(b"secret")) == (c.F_PASSWORD, b"secret\0")
    assert body_of(codec.build_sasl_response(b"c=biws")) == (c.F_PASSWORD, b"c=biws")
    assert body_of(codec.build_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x")) == (
        c.F_PASSWORD,
        b"SCRAM-SHA-256\0\0\0\0\x09n,,n=,r=x",
    )


def test_console_row_builders() -> None:
    msg_type, body = body_of(codec.build_row_description([("name", 25), ("n", 20)]))
    assert msg_type == c.B_ROW_DESCRIPTION
    assert body[:2] == b"\0\x02"
    assert body[2:7] == b"name\0"
    # table oid, column number, type oid, type size, type modifier, format code
    assert struct.unpack("!ihihih", body[7:25]) == (0, 0, 25, -1, -1, 0)

    msg_type, body = body_of(codec.build_data_row(["é", None, ""]))
    assert msg_type == c.B_DATA_ROW
    assert body == b"\0\x03" + b"\0\0\0\x02" + "é".encode() + b"\xff\xff\xff\xff" + b"\0\0\0\0"

    assert body_of(codec.build_command_complete("SHOW")) == (c.B_COMMAND_COMPLETE, b"SHOW\0")


@FUZZ
@given(
    parameters=st.dictionaries(WIRE_TEXT.filter(bool), WIRE_TEXT, max_size=5).filter(
        lambda p: len(codec.build_startup_message(p)) <= c.MAX_STARTUP_PACKET
    )
)
def test_startup_message_round_trip(parameters: dict[str, str]) -> None:
    packet = codec.parse_startup_packet(codec.build_startup_message(parameters))

    assert packet == StartupMessage(c.PROTOCOL_3_0, parameters)


def test_startup_message_user_and_database() -> None:
    packet = codec.parse_startup_packet(codec.build_startup_message({"user": "alice"}))
    assert isinstance(packet, StartupMessage)
    assert (packet.user, packet.database) == ("alice", "alice")  # database defaults to user

    packet = codec.parse_startup_packet(
        codec.build_startup_message({"user": "alice", "database": "app", "options": "-c x=1"})
    )
    assert isinstance(packet, StartupMessage)
    assert (packet.user, packet.database) == ("alice", "app")
    assert packet.parameters["options"] == "-c x=1"


def test_fixed_startup_packets() -> None:
    assert codec.parse_startup_packet(codec.build_ssl_request()) == SSLRequest()
    assert codec.parse_startup_packet(GSSENC_REQUEST) == GSSENCRequest()
    assert codec.parse_startup_packet(codec.build_cancel_request(1234, -5678)) == CancelRequest(1234, -5678)


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\0\0\0\x08\0\x03",  # shorter than 8
        struct.pack("!Ii", 9, c.PROTOCOL_3_0),  # length word says more than there is
        struct.pack("!Ii", 12, c.CANCEL_REQUEST_CODE) + b"\0\0\0\0",  # cancel must be 16 bytes
        startup_packet(c.PROTOCOL_3_0),  # no terminator
        startup_packet(c.PROTOCOL_3_0, b"user\0alice\0"),  # no terminator after the pairs
        startup_packet(c.PROTOCOL_3_0, b"user"),  # unterminated name
        startup_packet(c.PROTOCOL_3_0, b"user\0alice"),  # unterminated value
        startup_packet(c.PROTOCOL_3_0, b"\0junk"),  # data after terminator
        startup_packet(c.PROTOCOL_3_0, b"\xff\0x\0\0"),  # invalid UTF-8 name
        startup_packet(c.PROTOCOL_3_0, b"user\0\xc3\0\0"),  # invalid UTF-8 value
    ],
)
def test_malformed_startup_packets(packet: bytes) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        codec.parse_startup_packet(packet)
    assert type(excinfo.value) is ProtocolViolation


@pytest.mark.parametrize("version", [2 << 16, (1 << 16) | 0, (4 << 16) | 0, 1234, -1])
def test_other_protocol_versions_are_unsupported(version: int) -> None:
    packet = startup_packet(version, b"user\0alice\0\0")

    with pytest.raises(UnsupportedProtocol) as excinfo:
        codec.parse_startup_packet(packet)

    assert isinstance(excinfo.value, ProtocolViolation)
    assert excinfo.value.sqlstate == UnsupportedProtocol.sqlstate
    with pytest.raises(UnsupportedProtocol):
        StartupPacketReader().feed(packet)


def test_protocol_2_error_response() -> None:
    packet = startup_packet(2 << 16, b"user\0alice\0database\0app\0\0")
    with pytest.raises(UnsupportedProtocol) as excinfo:
        StartupPacketReader().feed(packet)

    fields = codec.parse_error_fields(body_of(excinfo.value.to_error_response())[1])

    assert fields["C"] == UnsupportedProtocol.sqlstate
    assert fields["S"] == "FATAL"
    assert "2.0" in fields["M"]


def test_protocol_3_minor_versions_are_accepted() -> None:
    # 3.2 (PostgreSQL 18 clients) still parses; negotiating the minor version is the caller's job.
    packet = codec.parse_startup_packet(startup_packet((3 << 16) | 2, b"user\0u\0\0"))
    assert packet == StartupMessage((3 << 16) | 2, {"user": "u"})


# --------------------------------------------------------------------------- StartupPacketReader

STARTUP_CASES = {
    "ssl": (codec.build_ssl_request(), SSLRequest()),
    "gssenc": (GSSENC_REQUEST, GSSENCRequest()),
    "cancel": (codec.build_cancel_request(42, -7), CancelRequest(42, -7)),
    "startup": (
        codec.build_startup_message({"user": "alice", "database": "app", "application_name": "t"}),
        StartupMessage(c.PROTOCOL_3_0, {"user": "alice", "database": "app", "application_name": "t"}),
    ),
}
# What may follow a startup packet in the same read: a TLS ClientHello after SSLRequest, a
# pipelining client's first message after the StartupMessage.
TRAILERS = [b"", b"\x16\x03\x01\x02\x00", codec.build_query("SELECT 1")]


def read_startup(chunks: list[bytes]) -> tuple[object, bytes]:
    """Feed chunks until a packet comes out; return it and every byte after it."""
    reader = StartupPacketReader()
    for i, chunk in enumerate(chunks):
        packet = reader.feed(chunk)
        if packet is not None:
            return packet, reader.take_rest() + b"".join(chunks[i + 1 :])
    return None, reader.take_rest()


@pytest.mark.parametrize("trailer", TRAILERS, ids=["alone", "tls", "query"])
@pytest.mark.parametrize("case", STARTUP_CASES, ids=str)
def test_startup_reader_whole_and_split(case: str, trailer: bytes) -> None:
    packet, expected = STARTUP_CASES[case]
    data = packet + trailer

    assert read_startup([data]) == (expected, trailer)
    for chunks in splits(data):
        assert read_startup(chunks) == (expected, trailer)


def test_startup_reader_returns_none_until_complete() -> None:
    reader = StartupPacketReader()
    packet = codec.build_startup_message({"user": "u"})

    for byte in packet[:-1]:
        assert reader.feed(bytes((byte,))) is None
    assert reader.feed(packet[-1:]) == StartupMessage(c.PROTOCOL_3_0, {"user": "u"})
    assert reader.take_rest() == b""


def test_startup_reader_ssl_then_startup_message() -> None:
    # After refusing SSL ('N') the client sends its StartupMessage through the same reader.
    reader = StartupPacketReader()
    startup = codec.build_startup_message({"user": "u"})

    assert reader.feed(codec.build_ssl_request() + startup[:3]) == SSLRequest()
    assert reader.feed(startup[3:]) == StartupMessage(c.PROTOCOL_3_0, {"user": "u"})


# PostgreSQL's MAX_STARTUP_PACKET_LENGTH counts the packet without its four-byte length word.
@pytest.mark.parametrize("length", [0, 4, 7, c.MAX_STARTUP_PACKET + 5, 2**31, 2**32 - 1, 0x58000000])
def test_startup_reader_refuses_bad_length_before_the_body(length: int) -> None:
    reader = StartupPacketReader()
    header = struct.pack("!I", length)

    assert reader.feed(header[:3]) is None
    assert len(reader) == 3
    with pytest.raises(InvalidStartupPacket, match="invalid length of startup packet"):
        reader.feed(header[3:])  # four bytes are enough to refuse: the body is never awaited


def test_startup_reader_refuses_a_whole_packet_over_the_limit_in_one_read() -> None:
    filler = "x" * (c.MAX_STARTUP_PACKET + 5 - len(codec.build_startup_message({"user": "u", "o": ""})))
    packet = codec.build_startup_message({"user": "u", "o": filler})
    with pytest.raises(InvalidStartupPacket):
        StartupPacketReader().feed(packet)


def test_startup_reader_accepts_the_largest_packet() -> None:
    filler = "x" * (c.MAX_STARTUP_PACKET + 4 - len(codec.build_startup_message({"user": "u", "o": ""})))
    packet = codec.build_startup_message({"user": "u", "o": filler})
    assert len(packet) == c.MAX_STARTUP_PACKET + 4

    reader = StartupPacketReader()
    assert reader.feed(packet[:-1]) is None
    assert reader.feed(packet[-1:]) == StartupMessage(c.PROTOCOL_3_0, {"user": "u", "o": filler})


# --------------------------------------------------------------------------- MessageReader

SERVER_LOGIN = (
    codec.build_authentication(c.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    + codec.AUTHENTICATION_OK
    + codec.build_parameter_status("server_version", "16.2")
    + codec.build_backend_key_data(1, 2)
    + codec.build_message(c.B_NO_DATA)  # an empty body
    + errors.build_notice_response("hi")
    + codec.READY_FOR_QUERY_IDLE
)


def expected_messages(data: bytes) -> list[tuple[int, bytes]]:
    messages = []
    pos = 0
    while pos < len(data):
        msg_type, length = codec.unpack_header(data, pos)
        messages.append((msg_type, data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages


def read_messages(
    chunks: list[bytes], max_message: int = codec.MAX_BUFFERED_MESSAGE
) -> list[tuple[int, bytes]]:
    reader = MessageReader(max_message)
    messages = []
    for chunk in chunks:
        messages.extend(reader.feed(chunk))
    assert len(reader) == 0
    return messages


def test_message_reader_whole_and_split() -> None:
    expected = expected_messages(SERVER_LOGIN)
    assert len(expected) == 7

    assert read_messages([SERVER_LOGIN]) == expected
    for chunks in splits(SERVER_LOGIN):
        assert read_messages(chunks) == expected


@FUZZ
@given(st.data())
def test_message_reader_random_splits(data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(SERVER_LOGIN)), max_size=20))

    assert read_messages(cut_at(SERVER_LOGIN, cuts)) == expected_messages(SERVER_LOGIN)


def test_message_reader_keeps_partial_message() -> None:
    reader = MessageReader()
    query = codec.build_query("SELECT 1")

    assert reader.feed(query + query[:7]) == [(c.F_QUERY, b"SELECT 1\0")]
    assert len(reader) == 7
    assert reader.take_rest() == query[:7]
    assert len(reader) == 0


def test_message_reader_max_message() -> None:
    limit = 100
    at_limit = codec.build_message(ord("d"), b"x" * (limit - 4))
    assert read_messages([at_limit], max_message=limit) == [(ord("d"), b"x" * (limit - 4))]

    reader = MessageReader(limit)
    over = codec.pack_header(ord("d"), limit + 1)
    with pytest.raises(ProtocolViolation, match="limit"):
        reader.feed(over)  # refused on the header alone, before any of the body arrives


def test_message_reader_default_limit() -> None:
    reader = MessageReader()
    with pytest.raises(ProtocolViolation):
        reader.feed(codec.pack_header(ord("D"), codec.MAX_BUFFERED_MESSAGE + 1))


@pytest.mark.parametrize("length", [0, 1, 3])
def test_message_reader_invalid_length(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        MessageReader().feed(codec.pack_header(ord("Z"), length))


# --------------------------------------------------------------------------- fuzzing


def only_protocol_violation(call: Callable[[], object]) -> None:
    with contextlib.suppress(ProtocolViolation):
        call()


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_fuzz_startup_reader(chunks: list[bytes]) -> None:
    reader = StartupPacketReader()

    def run() -> None:
        for chunk in chunks:
            reader.feed(chunk)

    only_protocol_violation(run)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=64),
        # Plausible headers with random bodies reach deeper than pure noise.
        st.builds(
            lambda code, body: startup_packet(code, body),
            st.sampled_from([c.PROTOCOL_3_0, c.CANCEL_REQUEST_CODE, c.SSL_REQUEST_CODE, 2 << 16, 0]),
            st.binary(max_size=40),
        ),
    )
)
def test_fuzz_parse_startup_packet(packet: bytes) -> None:
    only_protocol_violation(lambda: codec.parse_startup_packet(packet))
    only_protocol_violation(lambda: StartupPacketReader().feed(packet))


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6), st.integers(0, 200))
def test_fuzz_message_reader(chunks: list[bytes], max_message: int) -> None:
    reader = MessageReader(max_message)

    def run() -> None:
        for chunk in chunks:
            reader.feed(chunk)

    only_protocol_violation(run)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_body_parsers(body: bytes) -> None:
    for parse in (
        codec.parse_error_fields,
        codec.parse_parameter_status,
        codec.parse_backend_key_data,
        codec.parse_authentication,
        codec.parse_sasl_mechanisms,
    ):
        only_protocol_violation(functools.partial(parse, body))
    only_protocol_violation(lambda: codec.read_cstring(body, 0))


@pytest.mark.parametrize(
    ("code", "shown"),
    [(0xDEADBEEF, "57005.48879"), (0x00020000, "2.0"), (0x00040001, "4.1"), (0xFFFFFFFF, "65535.65535")],
)
def test_an_unsupported_protocol_is_named_as_major_minor_unsigned(code: int, shown: str) -> None:
    packet = startup_packet(code, b"user\0x\0\0\0")
    with pytest.raises(UnsupportedProtocol, match=rf"unsupported frontend protocol {re.escape(shown)}:"):
        codec.parse_startup_packet(packet)
