"""A minimal simple-query client for pypooler's (or PgBouncer's) admin console.

Used by `pypooler advise`; kept tiny on purpose: startup, trust or cleartext/md5 password, one
Query, rows as text. Nothing here is on the proxy's path.
"""

from __future__ import annotations

import asyncio
import hashlib

from pypooler.protocol import codec
from pypooler.protocol import constants as c


class ConsoleError(Exception):
    pass


async def simple_query(
    host: str,
    port: int,
    sql: str,
    *,
    user: str = "postgres",
    password: str | None = None,
    database: str = "pgbouncer",
    timeout: float = 30,
) -> tuple[list[str], list[list[str | None]]]:
    """Run one statement on the console; return (column names, rows)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(codec.build_startup_message({"user": user, "database": database}))
            messages = codec.MessageReader()
            columns: list[str] = []
            rows: list[list[str | None]] = []
            sent_query = False
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConsoleError("the console closed the connection")
                for msg_type, body in messages.feed(data):
                    if msg_type == c.B_AUTHENTICATION:
                        code, payload = codec.parse_authentication(body)
                        if code == c.AUTH_CLEARTEXT and password is not None:
                            writer.write(codec.build_password_message(password.encode()))
                        elif code == c.AUTH_MD5 and password is not None:
                            inner = hashlib.md5((password + user).encode()).hexdigest()
                            outer = hashlib.md5(inner.encode() + payload[:4]).hexdigest()
                            writer.write(codec.build_password_message(b"md5" + outer.encode()))
                        elif code != c.AUTH_OK:
                            raise ConsoleError(f"the console asks for authentication method {code}")
                    elif msg_type == c.B_ERROR_RESPONSE:
                        fields = codec.parse_error_fields(body)
                        raise ConsoleError(f"{fields.get('S')}: {fields.get('M')}")
                    elif msg_type == c.B_ROW_DESCRIPTION:
                        columns = _column_names(body)
                    elif msg_type == c.B_DATA_ROW:
                        rows.append(_row_values(body))
                    elif msg_type == c.B_READY_FOR_QUERY:
                        if sent_query:
                            writer.write(codec.TERMINATE)
                            return columns, rows
                        writer.write(codec.build_query(sql))
                        sent_query = True
        finally:
            writer.close()


def _column_names(body: bytes) -> list[str]:
    (count,) = codec.INT16.unpack_from(body)
    pos = 2
    names: list[str] = []
    for _ in range(count):
        name, pos = codec.read_cstring(body, pos, "column name")
        names.append(name)
        pos += 18  # table oid, column number, type oid, size, modifier, format
    return names


def _row_values(body: bytes) -> list[str | None]:
    (count,) = codec.INT16.unpack_from(body)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = codec.INT32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode("utf-8", "replace"))
            pos += length
    return values
