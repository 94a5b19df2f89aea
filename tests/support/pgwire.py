"""A minimal raw protocol-3 client for tests that need exact control of the bytes on the wire,
one-shot raw exchanges on a socket, and reading replies."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from pypooler.protocol import codec
from pypooler.protocol import constants as c


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._messages = codec.MessageReader(max_message=1 << 30)
        self._queue: list[tuple[int, bytes]] = []
        self.backend_key: tuple[int, int] | None = None  # from the BackendKeyData at login
        self.parameters: dict[str, str] = {}  # from ParameterStatus at login

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @classmethod
    async def login(
        cls, host: str, port: int, user: str = "postgres", database: str = "pypooler_test", **params: str
    ) -> RawClient:
        client = await cls.connect(host, port)
        client.send(codec.build_startup_message({"user": user, "database": database, **params}))
        messages = await client.until_ready()
        for msg_type, body in messages:
            if msg_type == c.B_BACKEND_KEY_DATA:
                client.backend_key = codec.parse_backend_key_data(body)
            elif msg_type == c.B_PARAMETER_STATUS:
                name, value = codec.parse_parameter_status(body)
                client.parameters[name] = value
        errors = [body for t, body in messages if t == c.B_ERROR_RESPONSE]
        if errors:
            await client.close()
            raise AssertionError(codec.parse_error_fields(errors[0]))
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def next_message(self, timeout: float = 10) -> tuple[int, bytes]:
        while not self._queue:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("connection closed by peer")
            self._queue.extend(self._messages.feed(data))
        return self._queue.pop(0)

    async def until_ready(self, timeout: float = 10) -> list[tuple[int, bytes]]:
        """Messages up to and including ReadyForQuery, or up to an ErrorResponse and EOF."""
        messages: list[tuple[int, bytes]] = []
        while True:
            try:
                msg = await self.next_message(timeout)
            except ConnectionError:
                if messages:
                    return messages
                raise
            messages.append(msg)
            if msg[0] == c.B_READY_FOR_QUERY:
                return messages

    async def query(self, sql: str) -> list[tuple[int, bytes]]:
        self.send(codec.build_query(sql))
        return await self.until_ready()

    async def cancel(self, host: str, port: int) -> None:
        """Send a CancelRequest with this client's key on a new connection, as libpq does."""
        assert self.backend_key is not None
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(codec.build_cancel_request(*self.backend_key))
        await writer.drain()
        await reader.read()  # the other side closes when it has taken the request
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.write(codec.TERMINATE)
            self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def error_fields(messages: list[tuple[int, bytes]]) -> dict[str, str] | None:
    for msg_type, body in messages:
        if msg_type == c.B_ERROR_RESPONSE:
            return codec.parse_error_fields(body)
    return None


def data_rows(messages: list[tuple[int, bytes]]) -> list[list[str | None]]:
    rows: list[list[str | None]] = []
    for msg_type, body in messages:
        if msg_type != c.B_DATA_ROW:
            continue
        (count,) = codec.INT16.unpack_from(body)
        pos = 2
        row: list[str | None] = []
        for _ in range(count):
            (length,) = codec.INT32.unpack_from(body, pos)
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + length].decode())
                pos += length
        rows.append(row)
    return rows


async def show(client: RawClient, subject: str) -> list[dict[str, str | None]]:
    """SHOW `subject` on an admin console session: its rows as {column: value}."""
    messages = await client.query(f"SHOW {subject}")
    assert error_fields(messages) is None, error_fields(messages)
    names = [name for name, _ in row_description(messages)]
    return [dict(zip(names, row, strict=True)) for row in data_rows(messages)]


def row_description(messages: list[tuple[int, bytes]]) -> list[list[Any]]:
    for msg_type, body in messages:
        if msg_type == c.B_ROW_DESCRIPTION:
            (count,) = codec.INT16.unpack_from(body)
            pos, columns = 2, []
            for _ in range(count):
                name, pos = codec.read_cstring(body, pos)
                (oid,) = codec.INT32.unpack_from(body, pos + 6)
                pos += 18
                columns.append([name, oid])
            return columns
    raise AssertionError(f"no RowDescription in {messages}")


def raw_exchange(port: int, data: bytes, timeout: float = 5, host: str = "127.0.0.1") -> bytes:
    """Connect, send `data`, half-close (so truncated input ends in EOF instead of a wait for
    client_login_timeout), and return all that comes back until the other side closes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # pypooler may already have closed on a bad first packet
            pass
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"neither an answer nor a close within {timeout} s: {data!r}") from None
            if not chunk:
                break
            received += chunk
        return received
