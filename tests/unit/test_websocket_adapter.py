"""websocket.py with bytes: the adapter's writes and close as frames, decoded binary messages to
the client in order, a text frame or a peer's close ending the client once. The real socket is a
recording stand-in; the client at the other end is wsproto's client side."""

from __future__ import annotations

import asyncio
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, Request, TextMessage

from pypooler import websocket


class RecordingSocket:
    """The real transport as the adapter uses it: what was written, and whether it closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5) if name == "peername" else default


class RecordingClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def connected() -> tuple[WSConnection, RecordingSocket, RecordingClient, websocket.WebSocketStream]:
    peer = WSConnection(ConnectionType.CLIENT)
    request = peer.send(Request(host="x", target="/v2?address=db:5432"))
    head, _, _ = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    ws, accepted = websocket.accept_upgrade(headers, lines[0].split()[1])  # type: ignore[arg-type]
    peer.receive_data(accepted)
    assert isinstance(next(peer.events()), AcceptConnection)
    raw, client = RecordingSocket(), RecordingClient()
    adapter = websocket.WebSocketTransport(raw, ws, client)  # type: ignore[arg-type]
    return peer, raw, client, websocket.WebSocketStream(adapter)


def peer_events(peer: WSConnection, raw: RecordingSocket) -> list[Any]:
    peer.receive_data(bytes(raw.written))
    raw.written.clear()
    return list(peer.events())


def test_binary_messages_reach_the_client_in_order_one_byte_at_a_time() -> None:
    peer, _, client, stream = connected()
    wire = peer.send(BytesMessage(data=b"startup")) + peer.send(BytesMessage(data=b"query"))
    for i in range(len(wire)):
        stream.data_received(wire[i : i + 1])
    assert client.received == b"startupquery" and client.lost == []


def test_writes_are_binary_messages_and_close_sends_a_close_frame() -> None:
    peer, raw, _, stream = connected()
    stream.adapter.write(b"R\x00\x00\x00\x08\x00\x00\x00\x00")
    stream.adapter.close()
    stream.adapter.write(b"after close")  # dropped, as a closing transport's
    events = peer_events(peer, raw)
    assert [type(e) for e in events] == [BytesMessage, CloseConnection]
    assert events[0].data == b"R\x00\x00\x00\x08\x00\x00\x00\x00" and events[1].code == 1000
    assert raw.closed and stream.adapter.is_closing()


def test_a_text_frame_closes_with_1003_and_ends_the_client_once() -> None:
    peer, raw, client, stream = connected()
    stream.data_received(peer.send(TextMessage(data="SELECT 1")))
    stream.connection_lost(None)  # the socket's own end afterwards
    (close,) = peer_events(peer, raw)
    assert isinstance(close, CloseConnection) and close.code == 1003
    assert raw.closed and client.lost == [None] and client.received == b""


def test_a_ping_is_answered_and_a_peer_close_is_answered_then_ends_the_client() -> None:
    peer, raw, client, stream = connected()
    stream.data_received(peer.send(Ping(payload=b"p")))
    (pong,) = peer_events(peer, raw)
    assert isinstance(pong, Pong) and pong.payload == b"p"
    stream.data_received(peer.send(CloseConnection(code=1000)))
    (close,) = peer_events(peer, raw)
    assert isinstance(close, CloseConnection) and raw.closed and client.lost == [None]


def test_a_connection_lost_mid_message_ends_the_client_with_what_arrived() -> None:
    peer, _, client, stream = connected()
    frame = peer.send(BytesMessage(data=b"0123456789"))
    stream.data_received(frame[:-4])
    error = ConnectionResetError()
    stream.connection_lost(error)
    assert client.lost == [error] and client.received == b"012345"


def test_flow_control_and_socket_details_pass_through() -> None:
    _, raw, _, stream = connected()
    stream.adapter.pause_reading()
    assert not raw.reading
    stream.adapter.resume_reading()
    assert raw.reading and stream.adapter.get_extra_info("peername") == ("127.0.0.1", 5)
