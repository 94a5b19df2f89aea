"""tcp_keepalive, tcp_keepidle/keepintvl/keepcnt and tcp_user_timeout on client sockets."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import asyncpg

from pypooler.config import load_settings
from pypooler.keepalive import keepalive_options
from tests.support.poolers import RunningPooler

OPTIONS = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)


def accepted_options(pooler: RunningPooler) -> tuple[int, ...]:
    """SO_KEEPALIVE and the four TCP options of the pooler's side of a new connection."""
    with socket.create_connection(("127.0.0.1", pooler.port)) as sock:
        sock.sendall(b"\x00")  # a byte, so the pooler has made its ClientConnection

        def read() -> tuple[int, ...]:
            (client,) = [c for c in pooler.pooler.registry.clients if not c.closed]
            raw: socket.socket = client.transport.get_extra_info("socket")
            keepalive = raw.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            return (keepalive, *[raw.getsockopt(socket.IPPROTO_TCP, option) for option in OPTIONS])

        for _ in range(100):
            try:
                return pooler.call(read)
            except ValueError:  # not accepted yet
                sock.recv(0)
        raise AssertionError("the pooler never accepted the connection")


def test_client_sockets_get_the_keepalive_settings_and_reload_changes_them(
    start_pooler: Callable[..., Any],
) -> None:
    pooler = start_pooler(tcp_keepidle=77, tcp_keepintvl=7, tcp_keepcnt=3, tcp_user_timeout=12345)
    assert accepted_options(pooler) == (1, 77, 7, 3, 12345)
    changed = pooler.settings.model_copy(update={"tcp_keepidle": 99, "tcp_user_timeout": 0})
    assert pooler.call(lambda: pooler.pooler.reload(changed))
    with open("/proc/sys/net/ipv4/tcp_keepalive_time") as file:
        os_idle = int(file.read())
    assert accepted_options(pooler) == (1, 99, 7, 3, 0)
    back = changed.model_copy(update={"tcp_keepidle": 0})
    assert pooler.call(lambda: pooler.pooler.reload(back))
    assert accepted_options(pooler)[:2] == (1, os_idle)
    off = changed.model_copy(update={"tcp_keepalive": False})
    assert pooler.call(lambda: pooler.pooler.reload(off))
    assert accepted_options(pooler)[0] == 0


def test_zero_leaves_the_os_default() -> None:
    settings = load_settings(None, env={})
    assert keepalive_options(settings) == ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),)


async def test_server_sockets_get_the_keepalive_settings(start_pooler: Callable[..., Any]) -> None:
    pooler = start_pooler(tcp_keepidle=61, tcp_user_timeout=4321)
    conn = await asyncpg.connect(pooler.dsn())
    try:
        assert await conn.fetchval("select 1") == 1

        def read() -> tuple[int, ...]:
            (server,) = pooler.pool().servers
            raw = server.transport.get_extra_info("socket")
            keepalive = raw.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            return (keepalive, *[raw.getsockopt(socket.IPPROTO_TCP, option) for option in OPTIONS])

        keepalive, idle, _, _, user_timeout = pooler.call(read)
        assert (keepalive, idle, user_timeout) == (1, 61, 4321)
    finally:
        await conn.close()
