"""Fake asyncio transports, and a pool with one logged-in server over them (no sockets).

Shared by the unit tests that drive real ClientConnection / ServerConnection / Pool objects and
by bench/hotpath (run as `python -m bench.hotpath` from the repository root).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pypooler.app import Pooler
from pypooler.config import load_settings
from pypooler.parameter_sets import intern_parameters
from pypooler.pool import Pool
from pypooler.protocol import codec
from pypooler.server import ServerConnection, ServerLogin

PEER = ("127.0.0.1", 40000)


class FakeSocket:
    family = 2  # AF_INET, so tune_transport sets its options

    def setsockopt(self, *args: Any) -> None:
        pass


class FakeTransport(asyncio.Transport):
    """Takes writes (kept in `written` unless `keep` is false; counted in `written_bytes`)."""

    def __init__(self, *, keep: bool = True) -> None:
        super().__init__()
        self.keep = keep
        self.written: list[bytes] = []
        self.written_bytes = 0
        self.closed = False
        self.eof_written = False
        self._extra = {"socket": FakeSocket(), "peername": PEER}

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written_bytes += len(data)
        if self.keep:
            self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def pool_with_one_server(
    database: str, user: str, application_name: str, *, keep: bool = True, **settings: Any
) -> tuple[Pooler, Pool, ServerConnection]:
    """A Pooler whose pool (`database`, `user`) of size 1 holds one idle server, logged in over a
    FakeTransport (`keep`: whether it keeps what it is sent) as a server that a client already
    gave its application_name: the steady state, with no settings to send at a lend. `settings`
    override the Pooler's. Call it on a running event loop."""
    config = load_settings(
        None, env={}, log_connections=False, log_disconnections=False, metrics_port=None,
        databases={database: {"host": "127.0.0.1", "port": 1, "pool_size": 1}}, **settings,
    )  # fmt: skip
    pooler = Pooler(config)
    pool = pooler.manager.get_pool(database, user)
    assert pool is not None
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    server = ServerConnection(ServerLogin("127.0.0.1", 1, database, user, None), done)
    server.connection_made(FakeTransport(keep=keep))
    server.data_received(
        codec.AUTHENTICATION_OK
        + codec.build_parameter_status("server_version", "16")
        + codec.build_parameter_status("application_name", application_name)
        + codec.build_backend_key_data(1, 2)
        + codec.build_ready_for_query()
    )
    pool.servers.add(server)
    server.on_close = pool.server_closed
    server.parameters = intern_parameters(server.parameters)
    pool.parameters = server.parameters
    if pool.rewriting:
        pool.fit_stream(server, rewriting=True)
    pool.release(server)
    return pooler, pool, server
