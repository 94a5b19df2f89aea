"""The PostgreSQL protocol inside a WebSocket (issue 18): what @neondatabase/serverless's Pool and
Client speak to its `wsProxy` (`/v2?address=host:port`, or any path: the address is ignored, the
database and user come from the startup packet as for TCP).

The HTTP listener (http_listener.py) parses the upgrade request with httptools and hands it here; the
WebSocket framing is wsproto's (sans-IO). From then on the connection is an ordinary
`ClientConnection` (auth, pools, limits, SHOW CLIENTS, stats): it sees a `WebSocketTransport`, an
object that behaves like the asyncio transport of a TCP client, so nothing on the TCP clients'
path changes.

The rules kept here:
- Binary messages carry the wire protocol both ways. Message boundaries mean nothing to it (the
  driver coalesces writes): each decoded chunk goes to the client as it arrives, so a large
  message is never buffered whole. Each `write` of the client is one binary message.
- A text message is a protocol error: close code 1003, and the connection ends.
- A ping is answered; a close from the peer is answered and the connection ends. A connection
  that ends mid-message (or a malformed frame, close code 1002) ends the client as a lost TCP
  connection would: `connection_lost` once, whichever way it ended.
- Flow control passes through: the client pauses and resumes reading of the real socket, and
  the socket's pause_writing/resume_writing reach the client.
- PostgreSQL's own TLS is not offered inside the tunnel (an SSLRequest is answered 'N'); when the
  listener speaks HTTPS the client counts as a TLS client (client_tls_sslmode = require, hba's
  hostssl).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

log = logging.getLogger("pypooler.websocket")

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003  # RFC 6455 7.4.1: a type of data the endpoint cannot accept


class HandshakeRefused(Exception):
    """The upgrade request is not a valid WebSocket opening handshake (HTTP 400)."""


def accept_upgrade(headers: list[tuple[bytes, bytes]], target: bytes) -> tuple[WSConnection, bytes]:
    """wsproto's server side of a handshake the listener already parsed: the connection and the 101 reply."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.initiate_upgrade_connection(headers, target)
    except RemoteProtocolError as exc:
        raise HandshakeRefused(str(exc)) from None
    request = next(ws.events(), None)
    if not isinstance(request, Request):
        raise HandshakeRefused("not a WebSocket upgrade request")
    # No subprotocol: the driver asks for none, and the stream is the wire protocol itself.
    return ws, ws.send(AcceptConnection())


def transport_name(transport: asyncio.BaseTransport) -> str:
    """How a client connection reached pypooler, for SHOW CLIENTS and the metrics: websocket,
    unix or tcp (a `POST /sql` request is `http`, see http_client.py)."""
    if isinstance(transport, WebSocketTransport):
        return "websocket"
    return "tcp" if isinstance(transport.get_extra_info("peername"), tuple) else "unix"


class WebSocketTransport(asyncio.Transport):
    """What a ClientConnection writes to and controls: the real transport, with every write a
    binary message and `close` a close frame first (see the module rules). A subclass of
    asyncio.Transport so the client's (compiled) typed attribute takes it."""

    __slots__ = ("_closing", "protocol", "raw", "ws")

    def __init__(self, raw: asyncio.Transport, ws: WSConnection, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.raw = raw
        self.ws = ws
        self.protocol = protocol  # where received bytes go (the admin console may take over)
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self.raw.write(self.ws.send(BytesMessage(data=bytes(data))))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if self._closing:
            return
        self._closing = True
        if self.ws.state is ConnectionState.OPEN or self.ws.state is ConnectionState.REMOTE_CLOSING:
            self.raw.write(self.ws.send(CloseConnection(code=code, reason=reason)))
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol


class WebSocketStream(asyncio.Protocol):
    """The real socket's protocol after the upgrade: frames in, the client's bytes out."""

    __slots__ = ("_lost", "adapter", "ws")

    def __init__(self, adapter: WebSocketTransport) -> None:
        self.adapter = adapter
        self.ws = adapter.ws
        self._lost = False

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        adapter = self.adapter
        for event in ws.events():
            if isinstance(event, BytesMessage):
                if not adapter.is_closing():
                    adapter.protocol.data_received(bytes(event.data))
            elif isinstance(event, TextMessage):
                adapter.close(CLOSE_UNSUPPORTED_DATA, "binary frames only: the PostgreSQL protocol")
                self._end(None)
                return
            elif isinstance(event, Ping):
                adapter.raw.write(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                # The peer's close (answered), or a frame wsproto could not parse (its code).
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    adapter.raw.write(ws.send(event.response()))
                elif ws.state is ConnectionState.OPEN:
                    adapter.raw.write(ws.send(CloseConnection(code=event.code, reason=event.reason)))
                adapter._closing = True
                adapter.raw.close()
                self._end(None)
                return

    def eof_received(self) -> bool | None:
        return None  # the socket closes; connection_lost ends the client

    def connection_lost(self, exc: Exception | None) -> None:
        self.adapter._closing = True
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.adapter.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.adapter.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.adapter.protocol.resume_writing()
