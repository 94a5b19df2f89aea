"""ClientConnection's one state: what each state means for the connection, and that only the
transitions in client.TRANSITIONS happen. Real objects over fake transports (test_client_release's
Rig); runs on both builds."""

from __future__ import annotations

import pytest

from pypooler.client import TRANSITIONS, ClientConnection, ClientState
from pypooler.protocol import codec
from pypooler.protocol.errors import ShuttingDown
from pypooler.registry import ClientTable, cancel_key_of
from pypooler.rewriting import RewritingFrontend
from tests.support.transports import FakeTransport
from tests.unit.test_client_release import STARTUP, Rig


def sent(client: ClientConnection) -> list[tuple[int, bytes]]:
    transport = client.transport
    assert isinstance(transport, FakeTransport)
    return codec.MessageReader().feed(b"".join(transport.written))


def state_of(client: ClientConnection) -> ClientState:
    """The state now: mypy would carry an earlier assert's narrowing across the calls that move it."""
    return client.state


def connected(rig: Rig) -> ClientConnection:
    client = ClientConnection(rig.pooler.registry)
    client.connection_made(FakeTransport())
    return client


async def test_a_login_ends_welcomed_without_its_login_machine_or_streams() -> None:
    rig = Rig()
    client = connected(rig)
    assert client.state is ClientState.LOGGING_IN and client in rig.pooler.registry.logging_in
    client.data_received(STARTUP[:5])
    assert client.state is ClientState.LOGGING_IN and not client.logged_in

    client.data_received(STARTUP[5:])

    assert state_of(client) is ClientState.WELCOMED and client.logged_in and not client.ready
    assert client.login is None and client not in rig.pooler.registry.logging_in
    assert client.rewriter is None  # built at the first message: an idle client holds none


async def test_the_first_message_builds_the_streams_and_makes_the_client_ready() -> None:
    rig = Rig()
    client = rig.client()

    client.data_received(codec.build_query("SELECT 1"))

    assert client.state is ClientState.READY and client.ready
    assert isinstance(client.rewriter, RewritingFrontend) and client.frontend is client.rewriter
    assert client.server is rig.server


async def test_failing_then_the_loss_close_the_client_once() -> None:
    rig = Rig()
    client = rig.client()

    client.fail(ShuttingDown("shutting down"))
    assert client.state is ClientState.CLOSING and client.closed and not client.logged_in
    client.connection_lost(None)
    client.connection_lost(None)  # a failed TLS handshake reports the loss twice

    assert state_of(client) is ClientState.CLOSED and client not in rig.pooler.registry.clients


async def test_a_transition_not_in_the_table_is_refused() -> None:
    client = connected(Rig())

    with pytest.raises(RuntimeError, match="LOGGING_IN -> READY"):
        client._set_state(ClientState.READY)
    assert client.state is ClientState.LOGGING_IN


def test_every_state_is_in_the_table_and_closed_is_the_end() -> None:
    assert set(TRANSITIONS) == set(ClientState)
    assert TRANSITIONS[ClientState.CLOSED] == frozenset()
    assert all(
        ClientState.CLOSED in targets
        for state, targets in TRANSITIONS.items()
        if state is not ClientState.CLOSED
    )


async def test_the_backend_key_data_finds_its_client_and_nobody_else() -> None:
    rig = Rig()
    first, second = rig.client(), rig.client()

    for client in (first, second):
        [key] = [codec.parse_backend_key_data(body) for t, body in sent(client) if t == ord("K")]
        assert client.cancel_key == cancel_key_of(*key) and key[0] > 0
        assert rig.pooler.registry.clients.at(key[0] & 0xFFFFFF) is client
    assert first.cancel_key >> 32 != second.cancel_key >> 32


async def test_the_client_table_reuses_slots_and_reads_like_a_set() -> None:
    registry = Rig().pooler.registry
    a, b, c = (ClientConnection(registry) for _ in range(3))  # not connected: in no table yet
    table = ClientTable()
    table.add(a)
    table.add(b)
    table.discard(a)
    table.discard(a)  # twice: no effect
    table.add(c)

    assert (len(table), set(table), a in table, b in table) == (2, {b, c}, False, True)
    assert c.cancel_key >> 32 == 1 and table.at(1) is c and table.at(0) is None and table.at(99) is None
