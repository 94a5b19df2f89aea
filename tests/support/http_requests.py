"""Raw HTTP/1.1 requests to pypooler's HTTP listener, as @neondatabase/serverless's neon() sends
them, and their responses read back: for tests that need exact bytes or an open keep-alive
connection."""

from __future__ import annotations

import asyncio
import json
from typing import Any

CONNECTION_STRING = "postgresql://postgres@x/pypooler_test"


def sql_request(body: bytes, *, extra: str = "", connection_string: str = CONNECTION_STRING) -> bytes:
    return (
        "POST /sql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Neon-Connection-String: {connection_string}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


DRIVER_HEADERS = "Neon-Array-Mode: true\r\nNeon-Raw-Text-Output: true\r\n"


def query_request(
    sql: str,
    params: list[Any] | None = None,
    *,
    extra: str = "",
    connection_string: str = CONNECTION_STRING,
) -> bytes:
    """One query as neon() sends it: rows come back as arrays of text."""
    body = json.dumps({"query": sql, "params": params or []}).encode()
    return sql_request(body, extra=DRIVER_HEADERS + extra, connection_string=connection_string)


async def read_response(reader: asyncio.StreamReader, timeout: float = 10) -> tuple[int, dict[str, Any]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    return status, json.loads(body)
