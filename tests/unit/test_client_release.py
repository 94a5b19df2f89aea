"""ClientConnection gives servers back exactly when the release rule says so, and takes them only
through the pool's lend path.

Real ClientConnection / ServerConnection / Pool objects over fake transports (no sockets), as in
bench/hotpath: after every server read that ends the client's last request, the server is back
in the pool if and only if `protocol.transaction.releasable` answers yes for the streams' state
(with the client's own `keeps_server`: pinned). Runs on both builds.
"""

from __future__ import annotations

from typing import cast

import pytest

from pypooler.client import ClientConnection
from pypooler.protocol import codec, errors
from pypooler.protocol import constants as c
from pypooler.protocol.transaction import releasable
from tests.support.messages import (
    BIND_COMPLETE,
    PARSE_COMPLETE,
    SYNC,
    answer,
    bind,
    execute,
    notice,
    parse,
    query,
)
from tests.support.transports import FakeTransport, pool_with_one_server

STARTUP = codec.build_startup_message({"user": "u", "database": "db", "application_name": "app"})
I, T, E = c.TX_IDLE, c.TX_IN_TRANSACTION, c.TX_FAILED  # noqa: E741  (the status letters)


class Rig:
    """One pool with one logged-in server, and clients logged in to it."""

    def __init__(self, pool_mode: str = "transaction") -> None:
        self.pooler, self.pool, self.server = pool_with_one_server("db", "u", "app", pool_mode=pool_mode)

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
    # A Query, then the next batch, unsynced.
    client.data_received(query("SELECT 1") + parse("", "SELECT 1") + bind() + execute())
    assert not rig.reply(client, answer("SELECT 1"))
    client.data_received(SYNC)

    assert rig.reply(client, PARSE_COMPLETE + BIND_COMPLETE + answer("SELECT 1"))


async def test_a_server_message_cut_after_the_ready_for_query_keeps_the_server() -> None:
    rig = Rig()
    client = rig.client()
    client.data_received(query("SELECT 1"))

    assert not rig.reply(client, answer("SELECT 1") + notice("hi")[:7])


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
