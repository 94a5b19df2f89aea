"""PostgreSQL clients inside a WebSocket (websocket.py), driven frame by frame: an ordinary client
once logged in (queries, SHOW CLIENTS, client counts); a text frame and a connection cut
mid-message end that connection alone."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from pypooler.protocol import codec
from tests.support.pgwire import RawClient, data_rows, error_fields, show
from tests.support.poolers import RunningPooler
from tests.support.waiting import eventually
from tests.support.websockets import WsClient


@pytest.fixture
def pooler(start_pooler: Callable[..., RunningPooler]) -> RunningPooler:
    return start_pooler(pool_size=2, http_listen_addr="127.0.0.1", http_listen_port=0)


def ws_port(pooler: RunningPooler) -> int:
    port = pooler.pooler.http_port
    assert port is not None
    return port


def client_count(pooler: RunningPooler) -> int:
    return pooler.call(lambda: len(pooler.pooler.registry.clients))


async def test_a_websocket_client_is_an_ordinary_client(pooler: RunningPooler) -> None:
    ws = await WsClient.login(ws_port(pooler), application_name="over-ws")
    admin = await RawClient.login(pooler.host, pooler.port, database="pgbouncer")
    try:
        assert data_rows(await ws.query("SELECT 40 + 2")) == [["42"]]
        clients = {row["application_name"]: row for row in await show(admin, "CLIENTS")}
        assert clients["over-ws"]["addr"] == "127.0.0.1" and clients["over-ws"]["database"] == "pypooler_test"
    finally:
        await admin.close()
        await ws.close()
    await eventually(lambda: client_count(pooler) == 0)


async def test_a_text_frame_closes_that_connection_with_1003(pooler: RunningPooler) -> None:
    port = ws_port(pooler)
    bystander = await WsClient.login(port)
    offender = await WsClient.login(port)
    try:
        offender.send_text("SELECT 1")
        assert await offender.close_code() == 1003
        assert data_rows(await bystander.query("SELECT 1")) == [["1"]]
        await eventually(lambda: client_count(pooler) == 1)
    finally:
        await offender.close()
        await bystander.close()


async def test_a_connection_cut_mid_message_ends_that_client_alone(pooler: RunningPooler) -> None:
    port = ws_port(pooler)
    bystander = await WsClient.login(port)
    cut = await WsClient.login(port)
    try:
        # A masked binary frame announcing 100 bytes, of which 10 arrive before the socket ends.
        cut.writer.write(bytes((0x82, 0x80 | 100)) + struct.pack("!I", 0) + b"Q\x00\x00\x00\x63SELECT")
        await cut.writer.drain()
        cut.abort()
        await eventually(lambda: client_count(pooler) == 1)
        assert data_rows(await bystander.query("SELECT 2")) == [["2"]]
    finally:
        await bystander.close()


async def test_the_admin_console_over_a_websocket(pooler: RunningPooler) -> None:
    console = await WsClient.login(ws_port(pooler), database="pgbouncer")
    try:
        messages = await console.query("SHOW VERSION")
        assert error_fields(messages) is None and "pypooler" in str(data_rows(messages))
    finally:
        await console.close()


async def test_max_client_conn_counts_websocket_clients(start_pooler: Callable[..., RunningPooler]) -> None:
    pooler = start_pooler(pool_size=1, max_client_conn=1, http_listen_addr="127.0.0.1", http_listen_port=0)
    first = await WsClient.login(ws_port(pooler))
    second = await WsClient.connect(ws_port(pooler))
    try:
        second.send(codec.build_startup_message({"user": "postgres", "database": "pypooler_test"}))
        refused = error_fields([await second.next_message()])
        assert refused is not None and refused["C"] == "53300"
        assert data_rows(await first.query("SELECT 1")) == [["1"]]
    finally:
        await second.close()
        await first.close()
