"""The HTTP listener (issue 18): SQL over HTTP on an address and port of its own, off by default.

`POST /sql` is `sql_over_http.handle_sql` (the request and response shapes of
@neondatabase/serverless's `neon()`); a WebSocket upgrade on any path (the driver's
`/v2?address=...`) becomes a PostgreSQL client connection (websocket.py); every other path is 404.

The rules kept here:
- HTTP/1.1 framing is h11's (sans-IO: one `h11.Connection` per socket, fed from data_received).
  One request at a time per connection: reading pauses while its response is being made, so a
  pipelining client cannot queue work without bound; keep-alive is allowed.
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
from typing import TYPE_CHECKING, Any, cast

import h11

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
        self.port = 0

    async def start(self, address: str, port: int) -> None:
        tls = self.pooler.registry.tls
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HttpConnection(self),
            None if address == "*" else address,
            port,
            ssl=tls.context if tls is not None and tls.mode != "disable" else None,
            reuse_address=True,
            backlog=self.pooler.settings.listen_backlog,  # a fan-out connects all at once
        )
        self.port = self._server.sockets[0].getsockname()[1]
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


def _is_websocket_upgrade(request: h11.Request | None) -> bool:
    return request is not None and any(
        name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers
    )


class HttpConnection(asyncio.Protocol):
    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.busy = False  # a response is being made: reading is paused
        self.waiting_since_ns = self.connected_ns = time.monotonic_ns()  # since when a request is due
        self.peer = "?"

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
        self.h11.receive_data(data)
        self._read_events()

    def eof_received(self) -> bool | None:
        self.h11.receive_data(b"")
        self._read_events()
        return None

    def _read_events(self) -> None:
        limit = self.listener.pooler.settings.http_max_body_bytes
        while not self.busy and not self.transport.is_closing():
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                self._fail(status, f"bad HTTP request: {exc}" if status != 431 else "request head too large")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                # h11 bounds a head still arriving; one that came whole in a read is measured here.
                if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > HEAD_LIMIT:
                    self._fail(431, "request head too large")
                    return
                self.request = event
                self.body.clear()
            elif isinstance(event, h11.Data):
                if len(self.body) + len(event.data) > limit:
                    self._fail(413, f"request body over http_max_body_bytes ({limit})")
                    return
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if _is_websocket_upgrade(self.request):
                    self._upgrade()
                    return
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _upgrade(self) -> None:
        """The handshake (wsproto), then this socket is a PostgreSQL client (websocket.py)."""
        request = self.request
        assert request is not None
        try:
            if request.method != b"GET":
                raise websocket.HandshakeRefused("a WebSocket upgrade is a GET")
            ws, accepted = websocket.accept_upgrade(list(request.headers), request.target)
        except websocket.HandshakeRefused as exc:
            self._fail(400, f"bad WebSocket upgrade: {exc}")
            return
        early, _ = self.h11.trailing_data  # frames sent before our 101 arrived
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
        if early:
            stream.data_received(early)

    def _dispatch(self) -> None:
        request = self.request
        assert request is not None
        self.busy = True
        self.transport.pause_reading()
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        http_request = HttpRequest(
            method=request.method.decode("latin-1").upper(), path=path, query=query,
            headers=headers, body=bytes(self.body), peer=self.peer,
            tls=self.transport.get_extra_info("ssl_object") is not None,
            connected_ns=self.connected_ns, transport=self.transport,
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._respond(http_request))
        self.listener.tasks.add(task)
        task.add_done_callback(self.listener.tasks.discard)

    async def _respond(self, request: HttpRequest) -> None:
        try:
            response = await self.listener.route(request)
        except asyncio.CancelledError:
            self.transport.close()
            raise
        except Exception:
            log.exception("HTTP %s %s from %s failed", request.method, request.path, self.peer)
            response = json_error(500, "pypooler failed to answer this request", "XX000")
        if self.transport.is_closing():
            return
        self._send(response)
        if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.transport.close()
            return
        self.busy = False
        self.waiting_since_ns = time.monotonic_ns()
        self.transport.resume_reading()
        self._read_events()  # a pipelined request already received

    def _send(self, response: HttpResponse) -> None:
        headers = [*response.headers, ("content-length", str(len(response.body)))]
        if not any(name.lower() == "content-type" for name, _ in response.headers):
            headers.append(("content-type", "application/json"))
        self.transport.write(
            self.h11.send(h11.Response(status_code=response.status, headers=headers))
            + (self.h11.send(h11.Data(data=response.body)) or b"")
            + (self.h11.send(h11.EndOfMessage()) or b"")
        )

    def _fail(self, status: int, message: str) -> None:
        """A request this connection cannot go on from: its error, then the close."""
        self.busy = True
        try:
            if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self._send(json_error(status, message, "08P01"))
        except h11.LocalProtocolError:
            pass
        self.transport.close()
