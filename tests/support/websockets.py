"""A WebSocket client for tests (wsproto's client side on asyncio streams): the PostgreSQL
protocol inside binary messages, as @neondatabase/serverless sends it, with exact control of the
frames (a text frame, a message cut short)."""

from __future__ import annotations

import asyncio

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Event, Request, TextMessage

from pypooler.protocol import codec
from pypooler.protocol import constants as c


class WsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._messages = codec.MessageReader(max_message=1 << 30)
        self._queue: list[tuple[int, bytes]] = []
        self.closed_with: int | None = None  # the close code pypooler sent

    @classmethod
    async def connect(cls, port: int, target: str = "/v2?address=127.0.0.1:5432") -> WsClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(client.ws.send(Request(host="127.0.0.1", target=target)))
        for event in await client._events():
            assert isinstance(event, AcceptConnection), event
        return client

    @classmethod
    async def login(
        cls, port: int, user: str = "postgres", database: str = "pypooler_test", **params: str
    ) -> WsClient:
        client = await cls.connect(port)
        client.send(codec.build_startup_message({"user": user, "database": database, **params}))
        messages = await client.until_ready()
        assert all(t != c.B_ERROR_RESPONSE for t, _ in messages), messages
        return client

    async def _events(self, timeout: float = 10) -> list[Event]:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        if not data:
            raise ConnectionError("connection closed by peer")
        self.ws.receive_data(data)
        return list(self.ws.events())

    def send(self, data: bytes) -> None:
        self.writer.write(self.ws.send(BytesMessage(data=data)))

    def send_text(self, text: str) -> None:
        self.writer.write(self.ws.send(TextMessage(data=text)))

    async def next_message(self, timeout: float = 10) -> tuple[int, bytes]:
        while not self._queue:
            if self.closed_with is not None:  # what came before the close was read first
                raise ConnectionError(f"closed by peer: {self.closed_with}")
            for event in await self._events(timeout):
                if isinstance(event, BytesMessage):
                    self._queue.extend(self._messages.feed(bytes(event.data)))
                elif isinstance(event, CloseConnection):
                    self.closed_with = event.code
        return self._queue.pop(0)

    async def until_ready(self) -> list[tuple[int, bytes]]:
        messages = []
        while True:
            message = await self.next_message()
            messages.append(message)
            if message[0] == c.B_READY_FOR_QUERY:
                return messages

    async def query(self, sql: str) -> list[tuple[int, bytes]]:
        self.send(codec.build_query(sql))
        return await self.until_ready()

    async def close_code(self) -> int | None:
        """Read until pypooler closes: its close code (None if the socket ended without one)."""
        try:
            while True:
                await self.next_message()
        except ConnectionError:
            return self.closed_with

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
