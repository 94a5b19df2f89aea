"""Protocol messages for tests: what clients send, what servers answer, and reading bytes back.

Built on pypooler.protocol's own builders where they exist. Names are the messages' (wire order
of the fields where it matters); the defaults are the unnamed statement and portal.
"""

from __future__ import annotations

import itertools
import struct

from pypooler.protocol import codec, errors
from pypooler.protocol import constants as c

I, T, E = c.TX_IDLE, c.TX_IN_TRANSACTION, c.TX_FAILED  # noqa: E741  (the status letters)

# --------------------------------------------------------------------------- client messages


def query(sql: str) -> bytes:
    return codec.build_query(sql)


def parse(name: str, text: str, types: tuple[int, ...] = ()) -> bytes:
    rest = text.encode() + b"\0" + struct.pack(f"!h{len(types)}i", len(types), *types)
    return codec.build_parse(name.encode(), rest)


def bind(statement: str = "", portal: str = "", parameter: bytes | None = None) -> bytes:
    """Bind with no format codes: no parameter, or one text `parameter`."""
    if parameter is None:
        values = struct.pack("!hhh", 0, 0, 0)
    else:
        values = struct.pack("!hhi", 0, 1, len(parameter)) + parameter + struct.pack("!h", 0)
    return codec.build_message(c.F_BIND, portal.encode() + b"\0" + statement.encode() + b"\0" + values)


def describe(name: str = "", kind: str = "S") -> bytes:
    """Describe of a statement ("S") or portal ("P")."""
    return codec.build_message(c.F_DESCRIBE, kind.encode() + name.encode() + b"\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return codec.build_message(c.F_EXECUTE, portal.encode() + b"\0" + struct.pack("!i", max_rows))


def close(name: str, kind: str = "S") -> bytes:
    return codec.build_message(c.F_CLOSE, kind.encode() + name.encode() + b"\0")


SYNC = codec.SYNC
FLUSH = codec.build_message(c.F_FLUSH)
TERMINATE = codec.TERMINATE
COPY_DONE = codec.build_message(c.F_COPY_DONE)


def extended(sql: str, *, describe_kind: str = "P", flush: bool = False) -> bytes:
    """One statement the way libpq's PQexecParams sends it: Parse/Bind/Describe/Execute/Sync
    (no Describe with `describe_kind=""`, a Flush before the Sync with `flush`)."""
    return (
        parse("", sql)
        + bind()
        + (describe("", describe_kind) if describe_kind else b"")
        + execute()
        + (FLUSH if flush else b"")
        + SYNC
    )


def copy_data(payload: bytes) -> bytes:
    return codec.build_message(c.F_COPY_DATA, payload)


def copy_fail(reason: str) -> bytes:
    return codec.build_message(c.F_COPY_FAIL, reason.encode() + b"\0")


def function_call(oid: int) -> bytes:
    return codec.build_message(c.F_FUNCTION_CALL, struct.pack("!ihhi", oid, 0, 0, 0) + b"\0\0")


def startup_packet(code: int, body: bytes = b"") -> bytes:
    """A startup-phase packet with a correct length word: protocol version or request `code`,
    then `body` as it is (codec.build_startup_message builds a well-formed StartupMessage)."""
    return struct.pack("!II", 8 + len(body), code & 0xFFFFFFFF) + body  # signed or unsigned


# --------------------------------------------------------------------------- server messages

PARSE_COMPLETE = codec.PARSE_COMPLETE
BIND_COMPLETE = codec.build_message(c.B_BIND_COMPLETE)
NO_DATA = codec.build_message(c.B_NO_DATA)
SERVER_COPY_DONE = codec.build_message(c.B_COPY_DONE)


def ready(status: int = I) -> bytes:
    return codec.build_ready_for_query(status)


def rows(*values: str) -> bytes:
    """A RowDescription of one text column, then a DataRow per value."""
    return codec.build_row_description([("x", 25)]) + b"".join(codec.build_data_row([v]) for v in values)


def complete(tag: str) -> bytes:
    return codec.build_command_complete(tag)


def answer(tag: str, status: int = I) -> bytes:
    """CommandComplete, then ReadyForQuery."""
    return complete(tag) + ready(status)


def error(message: str = "syntax error", sqlstate: str = "42601") -> bytes:
    return errors.build_error_response("ERROR", sqlstate, message)


def notice(message: str) -> bytes:
    return codec.build_message(c.B_NOTICE_RESPONSE, b"SNOTICE\0M" + message.encode() + b"\0\0")


def copy_response(msg_type: int, columns: int = 1) -> bytes:
    """CopyInResponse or CopyOutResponse, text format."""
    return codec.build_message(msg_type, struct.pack("!bh", 0, columns) + b"\0\0" * columns)


def select_reply(*values: str, status: int = I) -> bytes:
    return rows(*values) + answer(f"SELECT {len(values)}", status)


# --------------------------------------------------------------------------- reading back


def messages(data: bytes) -> list[tuple[int, bytes]]:
    """Whole messages in `data`, as (type, body)."""
    return codec.MessageReader(max_message=1 << 30).feed(data)


def types(data: bytes) -> str:
    """The type letters of the messages in `data`."""
    return "".join(chr(t) for t, _ in messages(data))


def cut_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (in any order; repeats and the ends give empty pieces)."""
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]
