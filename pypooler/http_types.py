"""What the HTTP listener (http_listener.py) and its handlers (sql_over_http.py) exchange.

One request in, one response out: the listener parses HTTP, checks the limits that are the
transport's (head and body sizes, timeouts), routes, and writes the response; a handler sees a
whole request and builds a whole response (or a streamed one, see `HttpResponse.chunks`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class HttpRequest:
    method: str  # upper case
    path: str  # without the query string
    query: str  # the raw query string, "" if none
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    body: bytes
    peer: str  # "address:port" of the client, for logs and hba
    tls: bool = False  # it came over TLS (HTTPS): hba's hostssl lines match it
    connected_ns: int = 0  # monotonic: when its connection was accepted (SHOW CLIENTS)
    transport: asyncio.BaseTransport | None = None  # its connection, for socket addresses
    task: asyncio.Task[None] | None = None  # the task answering it (what a timeout interrupts)


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # When set, the body is sent as these chunks (chunked transfer encoding) and `body` is unused.
    chunks: AsyncIterator[bytes] | None = None
