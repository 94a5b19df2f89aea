"""The HTTP listener's own rules (http_listener.py): routing, keep-alive, the head and body
limits, malformed HTTP, a malformed WebSocket upgrade, and the slowloris rule; each
refusal affects its own connection only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from tests.support.http_requests import query_request, read_response, sql_request
from tests.support.poolers import RunningPooler


@pytest.fixture
def pooler(start_pooler: Callable[..., RunningPooler]) -> RunningPooler:
    return start_pooler(
        pool_size=2, http_listen_addr="127.0.0.1", http_listen_port=0, http_max_body_bytes=4096,
        client_login_timeout=1,
    )  # fmt: skip


async def test_keep_alive_serves_one_request_after_another(pooler: RunningPooler) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.pooler.http_port)
    try:
        for n in (1, 2):
            writer.write(sql_request(json.dumps({"query": "select $1::int", "params": [n]}).encode()))
            status, body = await read_response(reader)
            assert status == 200 and body["rows"] in ([[str(n)]], [{"int4": str(n)}], [[n]], [{"int4": n}])
        writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = await read_response(reader)
        assert status == 404 and "POST /sql" in body["message"]
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        (sql_request(b"x" * 5000), 413, "http_max_body_bytes"),
        (b"GET /sql HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", 431, "too large"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad HTTP request"),
        (
            b"GET /v2 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            400,
            "bad WebSocket upgrade",
        ),
    ],
)
async def test_refusals_are_clear_and_touch_only_their_connection(
    pooler: RunningPooler, request_bytes: bytes, status: int, words: str
) -> None:
    port = pooler.pooler.http_port
    bystander_reader, bystander = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes)
        got, body = await read_response(reader)
        assert got == status and words in body["message"]
        bystander.write(sql_request(json.dumps({"query": "select 1"}).encode()))
        assert (await read_response(bystander_reader))[0] == 200
    finally:
        writer.close()
        bystander.close()


async def test_a_request_that_never_arrives_whole_is_closed(pooler: RunningPooler) -> None:
    # client_login_timeout (1 s here) applies to HTTP as to TCP logins: slowloris.
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.pooler.http_port)
    try:
        writer.write(b"POST /sql HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(pooler: RunningPooler) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.pooler.http_port)
    try:
        writer.write(b"".join(query_request("SELECT $1::int", [n]) for n in (1, 2, 3)))
        for n in (1, 2, 3):
            status, body = await read_response(reader)
            assert (status, body["rows"]) == (200, [[str(n)]])
    finally:
        writer.close()


async def test_expect_continue_and_http_1_0(pooler: RunningPooler) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.pooler.http_port)
    try:
        request = query_request("SELECT 1", extra="Expect: 100-continue\r\n")
        head, _, body = request.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")  # curl waits for 100 Continue before a larger body
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        assert (await read_response(reader))[0] == 200
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.pooler.http_port)
    try:
        writer.write(query_request("SELECT 1").replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        assert (await read_response(reader))[0] == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""  # HTTP/1.0: closed after it
    finally:
        writer.close()


async def test_an_upgrade_to_another_protocol_is_refused(pooler: RunningPooler) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pooler.pooler.http_port)
    try:
        writer.write(
            b"GET /sql HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
        )
        status, body = await read_response(reader)
        assert status == 400 and "only WebSocket upgrades" in body["message"]
    finally:
        writer.close()
