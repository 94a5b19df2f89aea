"""Startup-phase fuzzing against a live pypooler: random, truncated and oversized startup packets
and SASL messages end in a clear error (or a plain close) and never in a hang or an exception on
the pooler's loop, while a well-behaved client keeps working next to them.

Each example writes its bytes, half-closes the socket (so truncated input ends in EOF instead of
waiting for client_login_timeout), and reads until pypooler closes.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from tests.support.messages import startup_packet
from tests.support.pgwire import raw_exchange

READ_TIMEOUT_S = 5
EXAMPLES = 150

codes = st.sampled_from(
    [c.PROTOCOL_3_0, c.SSL_REQUEST_CODE, c.GSSENC_REQUEST_CODE, c.CANCEL_REQUEST_CODE, 2 << 16]
) | st.integers(min_value=-(2**31), max_value=2**31 - 1)
names = st.sampled_from(["user", "database", "application_name", "options", "_pq_.x"]) | st.text(max_size=8)
parameters = st.dictionaries(names, st.text(max_size=12), max_size=4)


@st.composite
def startup_packets(draw: st.DrawFn) -> bytes:
    body = struct.pack("!i", draw(codes))
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in draw(parameters).items())
    if draw(st.booleans()):
        body += b"\0"
    length = len(body) + 4
    length = draw(st.sampled_from([length, length, 0, 4, 7, 10_001, 2**31 - 1, length + 1, length - 1]))
    return struct.pack("!I", length & 0xFFFFFFFF) + body


@st.composite
def sasl_messages(draw: st.DrawFn) -> bytes:
    mechanism = draw(st.sampled_from([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"PLAIN", b""]))
    data = draw(
        st.sampled_from([b"n,,n=,r=abc", b"y,,n=,r=abc", b"p=tls-server-end-point,,n=,r=x"])
        | st.binary(max_size=64)
    )
    data_length = draw(st.sampled_from([len(data), -1, len(data) + 3, 2**31 - 1]))
    body = mechanism + b"\0" + struct.pack("!i", data_length) + data
    message = codec.build_message(c.F_PASSWORD, body)
    if draw(st.booleans()):
        message += codec.build_message(c.F_PASSWORD, draw(st.binary(max_size=80)))
    if draw(st.integers(0, 9)) == 0:
        message = b"p" + struct.pack("!I", 100_000) + b"x" * 64  # over the login message limit
    cut = draw(st.integers(0, len(message)))
    return message[: cut if draw(st.booleans()) else len(message)]


SCRAM_STARTUP = codec.build_startup_message({"user": "pp_scram", "database": "pypooler_test"})
inputs = (
    st.binary(max_size=200)
    | startup_packets()
    | st.builds(lambda a, b: a + b, startup_packets(), st.binary(max_size=40))
    | st.builds(lambda msg: SCRAM_STARTUP + msg, sasl_messages())
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=inputs)
def test_startup_fuzz(fuzz_pooler: Any, good_client: psycopg.Connection[Any], data: bytes) -> None:
    received = raw_exchange(fuzz_pooler.port, data, READ_TIMEOUT_S)

    # Whatever came back is well-formed: answer bytes to SSL/GSS requests, then whole messages.
    while received[:1] in (b"N", b"S") and (len(received) == 1 or received[1:2] in (b"N", b"S", b"E", b"R")):
        received = received[1:]
    if received:
        messages = codec.MessageReader(max_message=1 << 20).feed(received)
        assert messages, received
        for msg_type, body in messages:
            if msg_type == c.B_ERROR_RESPONSE:
                fields = codec.parse_error_fields(body)
                assert fields["S"] == "FATAL" and len(fields["C"]) == 5 and fields["M"]
    row = good_client.execute("SELECT 42").fetchone()
    assert row == (42,)
    assert fuzz_pooler.loop_errors == []


@pytest.fixture
def fuzz_pooler(start_pooler: Callable[..., Any], postgres: EmbeddedPostgres, tmp_path: Path) -> Any:
    verifier = postgres.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pp_scram'")
    auth_file = tmp_path / "users.txt"
    auth_file.write_text(f'"pp_scram" "{verifier}"\n"postgres" "unused"\n')
    pooler = start_pooler(pool_size=2, auth_type="scram-sha-256", auth_file=str(auth_file))
    pooler.loop_errors = []
    pooler.loop.call_soon_threadsafe(
        pooler.loop.set_exception_handler,
        lambda loop, context: pooler.loop_errors.append(context.get("message")),
    )
    return pooler


@pytest.fixture
def good_client(fuzz_pooler: Any) -> Any:
    with psycopg.connect(
        host=fuzz_pooler.host, port=fuzz_pooler.port, dbname="pypooler_test", user="pp_scram",
        password="scrampass", sslmode="disable", prepare_threshold=None, autocommit=True,
        passfile="/nonexistent/pypooler-tests/pgpass",
    ) as conn:  # fmt: skip
        yield conn


# What PostgreSQL 15 does with first bytes that are no startup packet, or a bad one (observed on
# the session cluster, and asserted again below): "close" means it sends nothing and only logs
# ("invalid length of startup packet", "incomplete startup packet"); "error" means a FATAL
# ErrorResponse (PostgreSQL words protocol 2's in protocol 2's own format).
FIRST_BYTES = {
    "terminate before the startup packet (node-postgres connect(); end())": (b"X\0\0\0\4", "close"),
    "nothing at all": (b"", "close"),
    "half a length word": (b"\0\0", "close"),
    "length 4": (struct.pack("!I", 4), "close"),
    "length 7": (struct.pack("!Ii", 7, c.PROTOCOL_3_0)[:7], "close"),
    "length over the limit": (
        struct.pack("!Ii", c.MAX_STARTUP_PACKET + 5, c.PROTOCOL_3_0) + b"x" * 64,
        "close",
    ),
    "a body shorter than its length": (struct.pack("!Ii", 100, c.PROTOCOL_3_0) + b"user\0", "close"),
    "an HTTP request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "close"),
    "protocol 2": (startup_packet(2 << 16), "error"),
    "protocol 4": (startup_packet(4 << 16), "error"),
    "garbage with a plausible length": (b"\0\0\0\x10hello world!", "error"),
    "no user": (startup_packet(c.PROTOCOL_3_0, b"\0"), "error"),
    "no terminator": (startup_packet(c.PROTOCOL_3_0, b"user"), "error"),
}


@pytest.mark.parametrize("case", list(FIRST_BYTES))
def test_first_bytes_that_are_no_startup_packet_are_closed_on_as_postgresql_does(
    case: str, start_pooler: Callable[..., Any], postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    data, expected = FIRST_BYTES[case]
    caplog.set_level(logging.INFO, logger="pypooler.client")
    pooler = start_pooler()

    direct = raw_exchange(postgres.port, data, READ_TIMEOUT_S)
    pooled = raw_exchange(pooler.port, data, READ_TIMEOUT_S)

    assert (direct == b"", pooled == b"") == ((expected == "close"),) * 2, (direct, pooled)
    if expected == "error":
        fields = codec.parse_error_fields(codec.MessageReader().feed(pooled)[0][1])
        assert fields["S"] == "FATAL" and fields["M"]
    # Logged once, quietly, as PostgreSQL does at its LOG level; nothing for an empty one.
    for _ in range(100):  # the line about a client's EOF may come just after the close
        logged = [r for r in caplog.records if r.name == "pypooler.client"]
        if logged or not data:
            break
        time.sleep(0.01)
    if expected == "close":
        assert [r.levelname for r in logged] == (["INFO"] if data else []), logged
        assert all("startup packet" in r.getMessage() for r in logged)
