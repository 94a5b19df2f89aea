"""server.py's ServerConnection as an adapter: its one state enum moves only along `_NEXT`, the
`closed`/`lost` flags follow it, and `log_in` pumps the login machine (TLS answers included).
A fake transport, no socket; runs on both builds."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from pypooler.config import ServerTlsMode
from pypooler.protocol import codec
from pypooler.protocol.errors import ServerConnectFailed, ServerLoginFailed, build_error_response
from pypooler.server import _NEXT, ServerConnection, ServerLogin, ServerState
from tests.support.transports import FakeTransport

WELCOME = codec.AUTHENTICATION_OK + codec.build_backend_key_data(7, 8) + codec.build_ready_for_query()


def state(server: ServerConnection) -> ServerState:
    """Read anew (mypy would keep the value an earlier `is` test narrowed it to)."""
    return server.state


async def connected(tls_mode: ServerTlsMode = "disable") -> tuple[ServerConnection, FakeTransport]:
    context = ssl.create_default_context() if tls_mode != "disable" else None
    login = ServerLogin("db", 5432, "app", "alice", None, tls_mode=tls_mode, ssl_context=context)
    server = ServerConnection(login, asyncio.get_running_loop().create_future())
    transport = FakeTransport()
    server.connection_made(transport)
    return server, transport


async def logged_in() -> tuple[ServerConnection, FakeTransport]:
    server, transport = await connected()
    server.data_received(WELCOME)
    assert server.state is ServerState.READY
    return server, transport


def test_every_state_can_end_and_closed_is_final() -> None:
    assert set(_NEXT) == set(ServerState)
    for state, following in _NEXT.items():
        assert state is ServerState.CLOSED or ServerState.CLOSED in following
    assert _NEXT[ServerState.CLOSED] == frozenset()
    assert ServerState.LOGGING_IN not in _NEXT[ServerState.READY]  # logged in stays logged in


async def test_login_then_ready() -> None:
    server, _ = await connected()
    assert server.state is ServerState.LOGGING_IN and not server.closed

    server.data_received(WELCOME)

    assert state(server) is ServerState.READY and server.login_done.result() is None
    assert (server.process_id, server.secret_key) == (7, 8)


async def test_log_in_sends_the_startup_message_and_waits() -> None:
    server, transport = await connected()
    task = asyncio.get_running_loop().create_task(server.log_in())
    await asyncio.sleep(0)
    assert transport.written == [codec.build_startup_message({"user": "alice", "database": "app"})]

    server.data_received(WELCOME)
    await task


async def test_no_tls_with_prefer_logs_in_in_clear() -> None:
    server, transport = await connected("prefer")
    task = asyncio.get_running_loop().create_task(server.log_in())
    await asyncio.sleep(0)
    assert transport.written == [codec.build_ssl_request()]

    server.data_received(b"N")
    server.data_received(WELCOME)
    await task

    assert transport.written[1] == codec.build_startup_message({"user": "alice", "database": "app"})
    assert server.state is ServerState.READY and not server.tls


async def test_no_tls_when_required_fails_log_in_and_closes() -> None:
    server, transport = await connected("require")
    task = asyncio.get_running_loop().create_task(server.log_in())
    await asyncio.sleep(0)

    server.data_received(b"N")

    with pytest.raises(ServerConnectFailed, match="does not support SSL, but server_tls_sslmode is require"):
        await task
    assert server.state is ServerState.CLOSING and transport.closed


async def test_lost_before_the_tls_answer() -> None:
    server, _ = await connected("require")
    task = asyncio.get_running_loop().create_task(server.log_in())
    await asyncio.sleep(0)

    server.connection_lost(None)

    with pytest.raises(ServerConnectFailed, match="before answering SSLRequest: EOF"):
        await task
    assert server.state is ServerState.CLOSED and server.lost


async def test_a_refused_login_closes_with_the_servers_error() -> None:
    server, transport = await connected()

    server.data_received(build_error_response("FATAL", "28P01", "password authentication failed"))

    error = server.login_done.exception()
    assert isinstance(error, ServerLoginFailed) and error.sqlstate == "28P01"
    assert server.state is ServerState.CLOSING and server.closed and not server.lost
    assert transport.written[-1] == codec.TERMINATE


async def test_internal_query_then_ready_again() -> None:
    server, _ = await logged_in()
    seen: list[int] = []

    def on_message(msg_type: int, body: bytes) -> bool:
        seen.append(msg_type)
        return msg_type == ord("Z")

    server.run_internal("SELECT 1", on_message)
    assert state(server) is ServerState.INTERNAL

    server.data_received(codec.build_command_complete("SELECT 1") + codec.build_ready_for_query())

    assert seen == [ord("C"), ord("Z")] and state(server) is ServerState.READY


async def test_an_internal_callback_may_start_the_next_one() -> None:
    server, _ = await logged_in()
    second: list[int] = []

    def then(msg_type: int, body: bytes) -> bool:
        second.append(msg_type)
        return True

    def first(msg_type: int, body: bytes) -> bool:
        server.run_internal("SET x = 1", then)
        return True

    server.run_internal("RESET ALL", first)
    server.data_received(codec.build_ready_for_query())
    assert state(server) is ServerState.INTERNAL  # the second one's

    server.data_received(codec.build_ready_for_query())
    assert second == [ord("Z")] and state(server) is ServerState.READY


async def test_close_then_lost() -> None:
    server, transport = await logged_in()
    closed: list[ServerConnection] = []
    server.on_close = closed.append

    server.close()
    server.close()  # idempotent
    assert (server.state, server.closed, server.lost) == (ServerState.CLOSING, True, False)
    assert transport.written.count(codec.TERMINATE) == 1 and closed == [server]

    server.connection_lost(None)
    assert (server.state, server.closed, server.lost) == (ServerState.CLOSED, True, True)
    assert closed == [server]


async def test_an_internal_query_hears_of_the_loss() -> None:
    server, _ = await logged_in()
    seen: list[int] = []

    def on_message(msg_type: int, body: bytes) -> bool:
        seen.append(msg_type)
        return False

    server.run_internal("SELECT 1", on_message)

    server.connection_lost(ConnectionResetError())

    assert seen == [0] and server.state is ServerState.CLOSED


async def test_a_transition_outside_the_table_is_refused() -> None:
    server, _ = await logged_in()
    with pytest.raises(AssertionError, match="no transition from READY to LOGGING_IN"):
        server._set_state(ServerState.LOGGING_IN)
