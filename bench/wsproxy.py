"""A plain WebSocket-to-TCP relay in front of PostgreSQL: `python -m bench.wsproxy --port P
--pg-host H --pg-port Q`.

What users of `@neondatabase/serverless`'s `Pool`/`Client` run today without pypooler (Neon's
wsproxy does this job): each WebSocket gets its own TCP connection to PostgreSQL and binary
messages carry the wire protocol both ways, with no pooling, so a fan-out meets
max_connections. `bench.run`'s `httpfanout` scenario measures it as the direct target.

Rules:
- One PostgreSQL connection per WebSocket, opened when the handshake is accepted; bytes that
  arrive before it is up wait in a buffer. The driver's `?address=host:port` is ignored: the
  relay only ever connects to --pg-host:--pg-port (loopback).
- Each chunk PostgreSQL sends is one binary message; each binary message's bytes go on as they
  are. A text message closes with 1003; a close is answered; either side ending ends the other.
- Flow control passes through: a side whose transport is over its high-water mark pauses
  reading on the other side.
- Listens with the backlog pypooler's listen_backlog asks for (LISTEN_BACKLOG), so the relay's
  queue is not what the fan-out measures. Prints `listening <port>` once it is ready; SIGINT or
  SIGTERM stops it (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import cast

import uvloop
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

LOOPBACK = "127.0.0.1"
LISTEN_BACKLOG = 4096  # bench.run's: pypooler's listen_backlog default, and PgBouncer's there
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_UPSTREAM_FAILED = 1011  # RFC 6455 7.4.1: an unexpected condition on the server's side


class WebSocketSide(asyncio.Protocol):
    """The client's WebSocket: wsproto's server side, relaying to one `PostgresSide`."""

    __slots__ = ("pending", "postgres", "target", "transport", "ws")

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.ws = WSConnection(ConnectionType.SERVER)
        self.transport: asyncio.Transport | None = None
        self.postgres: PostgresSide | None = None
        self.pending = bytearray()  # wire bytes received before PostgreSQL's connection is up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                self._on_event(event)
        except RemoteProtocolError:
            self.close(CLOSE_PROTOCOL_ERROR)

    def _on_event(self, event: object) -> None:
        assert self.transport is not None
        if isinstance(event, Request):
            self.transport.write(self.ws.send(AcceptConnection()))
            asyncio.get_running_loop().create_task(self._connect())
        elif isinstance(event, BytesMessage):
            postgres = self.postgres
            if postgres is not None and postgres.transport is not None:
                postgres.transport.write(bytes(event.data))
            else:
                self.pending += event.data
        elif isinstance(event, TextMessage):
            self.close(CLOSE_UNSUPPORTED_DATA)
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self.transport.write(self.ws.send(event.response()))
            self.transport.close()
        elif isinstance(event, Ping):
            self.transport.write(self.ws.send(event.response()))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: PostgresSide(self), *self.target)
        except OSError:
            self.close(CLOSE_UPSTREAM_FAILED)

    def upstream_ready(self, postgres: PostgresSide) -> None:
        self.postgres = postgres
        if self.transport is None or self.transport.is_closing():
            postgres.close()
            return
        if self.pending and postgres.transport is not None:
            postgres.transport.write(bytes(self.pending))
            self.pending.clear()

    def relay(self, data: bytes) -> None:
        if self.transport is not None and self.ws.state is ConnectionState.OPEN:
            self.transport.write(self.ws.send(Message(data=data)))

    def close(self, code: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.ws.state is ConnectionState.OPEN:
            self.transport.write(self.ws.send(CloseConnection(code=code)))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.postgres is not None:
            self.postgres.close()

    def pause_writing(self) -> None:
        if self.postgres is not None and self.postgres.transport is not None:
            self.postgres.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.postgres is not None and self.postgres.transport is not None:
            self.postgres.transport.resume_reading()


class PostgresSide(asyncio.Protocol):
    """The TCP connection to PostgreSQL that one WebSocket owns."""

    __slots__ = ("client", "transport")

    def __init__(self, client: WebSocketSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.client.upstream_ready(self)

    def data_received(self, data: bytes) -> None:
        self.client.relay(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close(CLOSE_NORMAL if exc is None else CLOSE_UPSTREAM_FAILED)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()


async def serve(port: int, pg_host: str, pg_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    target = (pg_host, pg_port)
    server = await loop.create_server(
        lambda: WebSocketSide(target), LOOPBACK, port, backlog=LISTEN_BACKLOG, reuse_address=True
    )
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wsproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: the OS picks)")
    parser.add_argument("--pg-host", default=LOOPBACK)
    parser.add_argument("--pg-port", type=int, required=True)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.pg_host, args.pg_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
