"""The HTTP listener (issue 18): SQL over HTTP on an address and port of its own, off by default.

`POST /sql` is `sql_over_http.handle_sql` (the request and response shapes of
@neondatabase/serverless's `neon()`); a WebSocket upgrade on any path (the driver's
`/v2?address=...`) becomes a PostgreSQL client connection (websocket.py); every other path is 404.

The rules kept here:
- HTTP/1.1 parsing is httptools' (llhttp, in C: one parser per socket, fed from data_received;
  the pure-Python h11 cost more than the rest of a request). Responses are written here: a status
  line, content-type, content-length, and `connection: close` when the connection ends after it.
  One request at a time per connection: reading pauses while its response is being made, so a
  pipelining client cannot queue work without bound (requests already in the bytes read are
  answered in order); keep-alive is allowed, as HTTP/1.0's keep-alive rules say.
- A request head is at most HEAD_LIMIT bytes (431 past it), a body at most
  `http_max_body_bytes` (413); malformed HTTP gets 400; each of these closes the connection.
- The slowloris rule of TCP clients holds here too: a request must have arrived whole within
  `client_login_timeout` of its first byte (or of the connection, or of the previous response
  on a kept-alive connection), else the maintenance pass closes the connection (`expire`).
- TLS: with the client TLS settings (client_tls_sslmode other than disable) the listener speaks
  HTTPS only, with the same certificate (tls.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from pypooler import sql_over_http, websocket
from pypooler.client import ClientConnection
from pypooler.http_types import HttpRequest, HttpResponse
from pypooler.stats import NS_PER_S

if TYPE_CHECKING:
    from pypooler.app import Pooler

log = logging.getLogger("pypooler.http")

HEAD_LIMIT = 16 * 1024  # request line and headers; the driver's are well under 2 KiB


def json_error(status: int, message: str, code: str) -> HttpResponse:
    """An error in the shape the driver reads (its `message` and `code`)."""
    body = json.dumps({"message": message, "code": code}).encode()
    return HttpResponse(status, [("content-type", "application/json")], body)


class HttpListener:
    """The listening socket, its connections (for `expire` and `close`) and the routing."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start
        self.port = 0

    async def start(self, address: str, port: int) -> None:
        tls = self.pooler.registry.tls
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self),
            None if address == "*" else address,
            port,
            ssl=tls.context if tls is not None and tls.mode != "disable" else None,
            reuse_address=True,
            backlog=self.pooler.settings.listen_backlog,  # a fan-out connects all at once
        )
        server: Any = self._server  # uvloop's `sockets` is a list, not typeshed's tuple (mypyc checks)
        self.port = server.sockets[0].getsockname()[1]
        log.info("HTTP (SQL over HTTP) listening on %s:%d", address, self.port)

    async def route(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/sql":
            return await sql_over_http.handle_sql(self.pooler, request)
        return json_error(404, f"no such path: {request.path} (SQL over HTTP is POST /sql)", "08P01")

    def expire(self, now_ns: int, timeout_s: float) -> None:
        """The maintenance pass: close connections whose request is late (see the module rules)."""
        limit = now_ns - int(timeout_s * NS_PER_S)
        for connection in [c for c in self.connections if not c.busy and c.waiting_since_ns <= limit]:
            connection.transport.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self.tasks:
            task.cancel()
        for connection in list(self.connections):
            connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()


class _Request:
    """What the parser's callbacks gather of one request."""

    __slots__ = ("body", "head_bytes", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # names lower case, as wsproto takes them
        self.head_bytes = 0
        self.body = bytearray()


class HttpConnection(asyncio.Protocol):
    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.parser = httptools.HttpRequestParser(self)
        self.request = _Request()
        self.ready: deque[tuple[_Request, str, bool]] = deque()  # whole: (request, method, keep-alive)
        self.busy = False  # a response is being made: reading is paused
        self.waiting_since_ns = self.connected_ns = time.monotonic_ns()  # since when a request is due
        self.peer = "?"
        self.failed = False
        self.logins: dict[str, object] = {}  # see HttpRequest.logins

    # ------------------------------------------------------------------ the socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer: Any = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.listener.connections.add(self)
        self.listener.pooler.registry.http_connections += 1  # max_client_conn counts it

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def _forget(self) -> None:
        if self in self.listener.connections:
            self.listener.connections.discard(self)
            self.listener.pooler.registry.http_connections -= 1

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0] :] if upgrade.args else b"")
            return
        except httptools.HttpParserError as exc:
            if not self.failed:
                self._fail(400, f"bad HTTP request: {exc}")
            return
        if self.ready and not self.busy:
            self._dispatch()

    def eof_received(self) -> bool | None:
        return None  # close: a request cut short is not answered

    # ------------------------------------------------------------------ the parser's callbacks

    def on_message_begin(self) -> None:
        self.request = _Request()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self.request.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for name, value in self.request.headers:
            if name == b"expect" and value.lower() == b"100-continue" and not self.failed:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        limit = self.listener.pooler.settings.http_max_body_bytes
        request = self.request
        if len(request.body) + len(body) > limit:
            self._fail(413, f"request body over http_max_body_bytes ({limit})")
            raise httptools.HttpParserError("body too large")
        request.body += body

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser.should_upgrade():
            return  # feed_data raises HttpParserUpgrade next
        method = parser.get_method().decode("latin-1").upper()
        self.ready.append((self.request, method, parser.should_keep_alive()))
        if self.busy or len(self.ready) > 1:
            self.transport.pause_reading()

    def _count(self, size: int) -> None:
        # The head is bounded while it arrives (a slow one too); the body by http_max_body_bytes.
        request = self.request
        request.head_bytes += size
        if request.head_bytes > HEAD_LIMIT:
            self._fail(431, "request head too large")
            raise httptools.HttpParserError("head too large")

    # ------------------------------------------------------------------ requests

    def _upgrade(self, early: bytes) -> None:
        """The handshake (wsproto), then this socket is a PostgreSQL client (websocket.py)."""
        request = self.request
        try:
            if (b"upgrade", b"websocket") not in [(n, v.lower()) for n, v in request.headers]:
                raise websocket.HandshakeRefused("only WebSocket upgrades are served")
            if self.parser.get_method() != b"GET":
                raise websocket.HandshakeRefused("a WebSocket upgrade is a GET")
            ws, accepted = websocket.accept_upgrade(request.headers, request.url)
        except websocket.HandshakeRefused as exc:
            self._fail(400, f"bad WebSocket upgrade: {exc}")
            return
        self.busy = True
        self._forget()  # a client from here: its login timeout applies, and it counts itself
        raw = self.transport
        raw.write(accepted)
        client = ClientConnection(self.listener.pooler.registry)
        adapter = websocket.WebSocketTransport(raw, ws, client)
        stream = websocket.WebSocketStream(adapter)
        raw.set_protocol(stream)
        client.connection_made(adapter)
        login = client.login
        if login is not None:
            login.tls = raw.get_extra_info("ssl_object") is not None
            login.tls_available = False
        if early:  # frames sent before our 101 arrived
            stream.data_received(early)

    def _dispatch(self) -> None:
        request, method, keep_alive = self.ready.popleft()
        self.busy = True
        self.transport.pause_reading()
        target = request.url.decode("latin-1")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        transport = self.transport
        http_request = HttpRequest(
            method=method, path=path, query=query, headers=headers, body=bytes(request.body),
            peer=self.peer, tls=transport.get_extra_info("ssl_object") is not None,
            connected_ns=self.connected_ns, transport=transport, logins=self.logins,
        )  # fmt: skip
        task = http_request.task = self.listener.loop.create_task(self._respond(http_request, keep_alive))
        self.listener.tasks.add(task)
        task.add_done_callback(self.listener.tasks.discard)

    async def _respond(self, request: HttpRequest, keep_alive: bool) -> None:
        try:
            response = await self.listener.route(request)
        except asyncio.CancelledError:
            self.transport.close()
            raise
        except Exception:
            log.exception("HTTP %s %s from %s failed", request.method, request.path, self.peer)
            response = json_error(500, "pypooler failed to answer this request", "XX000")
        transport = self.transport
        if transport.is_closing():
            return
        self._send(response, keep_alive)
        if not keep_alive:
            transport.close()
            return
        self.busy = False
        self.waiting_since_ns = time.monotonic_ns()
        if self.ready:  # pipelined, already read
            self._dispatch()
        else:
            transport.resume_reading()

    def _send(self, response: HttpResponse, keep_alive: bool) -> None:
        status = response.status
        parts = [f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-length: {len(response.body)}\r\n"]
        has_type = False
        for name, value in response.headers:
            parts.append(f"{name}: {value}\r\n")
            has_type = has_type or name.lower() == "content-type"
        if not has_type:
            parts.append("content-type: application/json\r\n")
        if not keep_alive:
            parts.append("connection: close\r\n")
        parts.append("\r\n")
        self.transport.write("".join(parts).encode("latin-1") + response.body)

    def _fail(self, status: int, message: str) -> None:
        """A request this connection cannot go on from: its error, then the close."""
        if self.failed:
            return
        self.failed = self.busy = True
        self._send(json_error(status, message, "08P01"), keep_alive=False)
        self.transport.close()


_REASONS: Final = {status.value: status.phrase for status in HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
