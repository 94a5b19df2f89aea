"""ClientConnection gives servers back exactly when the release rule says so, and takes them only
through the pool's lend path.

Real ClientConnection / ServerConnection / Pool objects over fake transports (no sockets), as in
bench/hotpath: after every server read that ends the client's last request, the server is back
in the pool if and only if `protocol.transaction.releasable` answers yes for the streams' state
(with the client's own `keeps_server`: pinned). Runs on both builds.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from pypooler.app import Pooler
from pypooler.client import ClientConnection
from pypooler.config import load_settings
from pypooler.parameter_sets import intern_parameters
from pypooler.pool import Pool
from pypooler.protocol import codec, errors
from pypooler.protocol import constants as c
from pypooler.protocol.transaction import releasable
from pypooler.server import ServerConnection, ServerLogin

STARTUP = codec.build_startup_message({"user": "u", "database": "db", "application_name": "app"})
I, T, E = c.TX_IDLE, c.TX_IN_TRANSACTION, c.TX_FAILED  # noqa: E741  (the status letters)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Rig:
    """One pool with one logged-in server, and clients logged in to it."""

    def __init__(self, pool_mode: str = "transaction") -> None:
        settings = load_settings(
            None, env={}, log_connections=False, log_disconnections=False, metrics_port=None,
            pool_mode=pool_mode, databases={"db": {"host": "127.0.0.1", "port": 1, "pool_size": 1}},
        )  # fmt: skip
        self.pooler = Pooler(settings)
        pool = self.pooler.manager.get_pool("db", "u")
        assert pool is not None
        self.pool: Pool = pool
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        server = self.server = ServerConnection(ServerLogin("127.0.0.1", 1, "db", "u", None), done)
        server.connection_made(FakeTransport())
        server.data_received(
            codec.AUTHENTICATION_OK + codec.build_parameter_status("server_version", "16")
            + codec.build_parameter_status("application_name", "app")
            + codec.build_backend_key_data(1, 2) + codec.build_ready_for_query()
        )  # fmt: skip
        pool.servers.add(server)
        server.on_close = pool.server_closed
        server.parameters = intern_parameters(server.parameters)
        pool.parameters = server.parameters
        if pool.rewriting:
            pool.fit_stream(server, rewriting=True)
        pool.release(server)

    def client(self) -> ClientConnection:
        client = ClientConnection(self.pooler.registry)
        client.connection_made(FakeTransport())
        client.data_received(STARTUP)
        assert client.logged_in
        return client

    def reply(self, client: ClientConnection, data: bytes) -> bool:
        """The server sends `data`; whether the rule said "release" just before the client
        acted on it, checked against what the client did."""
        server = self.server
        server.data_received(data)
        rule = releasable(client.frontend, server.backend, keeps_server=client.pinned)
        released = client.server is None
        assert released == rule
        assert (server in self.pool.idle) == released
        return released


def query(sql: str) -> bytes:
    return codec.build_query(sql)


def answer(tag: str, status: int = I) -> bytes:
    return codec.build_command_complete(tag) + codec.build_ready_for_query(status)


async def test_a_transaction_ends_at_the_idle_ready_for_query() -> None:
    rig = Rig()
    client = rig.client()
    client.data_received(query("SELECT 1"))
    assert client.server is rig.server and rig.pool.next_idle is None

    assert rig.reply(client, answer("SELECT 1"))


async def test_a_transaction_block_keeps_its_server_until_it_ends() -> None:
    rig = Rig()
    client = rig.client()
    client.data_received(query("BEGIN"))
    assert not rig.reply(client, answer("BEGIN", T))
    client.data_received(query("SELEC 1"))
    failed = errors.build_error_response("ERROR", "42601", "syntax error") + codec.build_ready_for_query(E)
    assert not rig.reply(client, failed)
    client.data_received(query("ROLLBACK"))

    assert rig.reply(client, answer("ROLLBACK"))


async def test_a_pinned_client_keeps_its_server() -> None:
    rig = Rig()
    client = rig.client()
    client.pinned = True
    client.data_received(query("SELECT 1"))

    assert not rig.reply(client, answer("SELECT 1"))


async def test_an_open_extended_protocol_tail_keeps_the_server() -> None:
    rig = Rig()
    client = rig.client()
    parse = codec.build_message(c.F_PARSE, b"\0SELECT 1\0\0\0")
    bind = codec.build_message(c.F_BIND, b"\0\0\0\0\0\0\0\0")
    execute = codec.build_message(c.F_EXECUTE, b"\0\0\0\0\0")
    client.data_received(query("SELECT 1") + parse + bind + execute)  # the next batch, unsynced
    assert not rig.reply(client, answer("SELECT 1"))
    client.data_received(codec.SYNC)
    parse_complete = codec.build_message(c.B_PARSE_COMPLETE)
    bind_complete = codec.build_message(c.B_BIND_COMPLETE)

    assert rig.reply(client, parse_complete + bind_complete + answer("SELECT 1"))


async def test_a_server_message_cut_after_the_ready_for_query_keeps_the_server() -> None:
    rig = Rig()
    client = rig.client()
    client.data_received(query("SELECT 1"))
    notice = codec.build_message(c.B_NOTICE_RESPONSE, b"SNOTICE\0Mhi\0\0")

    assert not rig.reply(client, answer("SELECT 1") + notice[:7])


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_a_client_leaving_between_transactions_gives_its_server_back_by_the_rule(mode: str) -> None:
    rig = Rig(mode)
    client = rig.client()
    client.data_received(query("SELECT 1"))
    rig.server.data_received(answer("SELECT 1"))
    if mode == "transaction":
        assert client.server is None
        client.data_received(query("BEGIN"))
        rig.server.data_received(answer("BEGIN", T))
    server = client.server
    assert server is rig.server
    clean = releasable(client.frontend, server.backend)

    client.connection_lost(None)

    # Transaction mode: inside a block, so the server is closed. Session mode: at rest, so it
    # is reset (server_reset_query, run as an internal query) before it may go back.
    assert clean is (mode == "session")
    assert server.closed is not clean
    assert server not in rig.pool.idle


async def test_a_released_server_goes_to_the_waiting_client_with_its_bytes() -> None:
    rig = Rig()
    first, second = rig.client(), rig.client()
    first.data_received(query("SELECT 1"))
    second.data_received(query("SELECT 2"))
    assert second.waiting and rig.pool.waiting == 1 and second.server is None
    written = cast(FakeTransport, rig.server.transport).written

    rig.server.data_received(answer("SELECT 1"))

    assert first.server is None and second.server is rig.server and not second.waiting
    assert written[-1] == query("SELECT 2")
    assert rig.reply(second, answer("SELECT 1"))
