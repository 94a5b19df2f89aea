"""What the HTTP listener (http_listener.py) and its handlers (sql_over_http.py) exchange.

One request in, one response out: the listener parses HTTP, checks the limits that are the
transport's (head and body sizes, timeouts), routes, and writes the response; a handler sees a
whole request and builds a whole response (sql_over_http.py bounds its size instead of
streaming it).
"""

from __future__ import annotations

import asyncio


# Plain classes, not dataclasses: mypyc compiles their __init__, where a dataclass's stays the
# interpreted one the dataclasses module generates (one of each per request).
class HttpRequest:
    def __init__(
        self,
        method: str,  # upper case
        path: str,  # without the query string
        query: str,  # the raw query string, "" if none
        headers: dict[str, str],  # lower-case names; a repeated header's values joined with ", "
        body: bytes,
        peer: str,  # "address:port" of the client, for logs and hba
        tls: bool = False,  # it came over TLS (HTTPS): hba's hostssl lines match it
        connected_ns: int = 0,  # monotonic: when its connection was accepted (SHOW CLIENTS)
        transport: asyncio.BaseTransport | None = None,  # its connection, for socket addresses
        task: asyncio.Task[None] | None = None,  # the task answering it (what a timeout interrupts)
        logins: dict[str, object] | None = None,  # its connection's, kept across its requests
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.peer = peer
        self.tls = tls
        self.connected_ns = connected_ns
        self.transport = transport
        self.task = task
        # What a handler keeps for the connection's next requests (sql_over_http: the login).
        self.logins: dict[str, object] = logins if logins is not None else {}


class HttpResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        self.status = status
        self.headers: list[tuple[str, str]] = headers if headers is not None else []
        self.body = body
