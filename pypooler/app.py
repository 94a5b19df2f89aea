"""Wiring: the listener, the pools, the maintenance timer and orderly shutdown.

`Pooler` is what `pypooler run` (and the tests) start: it owns the listening socket, the
`Authenticator` (auth_file, hba, auth_query), the TLS contexts, the `PoolManager`, the
`ClientRegistry`, and one periodic maintenance callback (query_wait_timeout, server_idle_timeout,
client_login_timeout) shared by every pool and client, so no per-client timers exist on the hot
path. Building a `Pooler` loads every file the settings name and raises `ConfigError` (one line
per problem) if any is unusable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Coroutine
from typing import Any

from pypooler import advisor
from pypooler.auth import Authenticator
from pypooler.client import ClientConnection, ClientRegistry
from pypooler.config import ConfigError, Settings
from pypooler.metrics import MetricsServer
from pypooler.pool import PoolManager
from pypooler.tls import client_tls, server_ssl_context

log = logging.getLogger("pypooler")

# Seconds between maintenance passes: a tenth of the shortest timeout, kept within these bounds.
MAINTENANCE_MIN_INTERVAL = 0.05
MAINTENANCE_MAX_INTERVAL = 1.0
LISTEN_BACKLOG = 4096  # serverless bursts open many connections at once
# How long stop() waits for connections to close cleanly before aborting them.
STOP_GRACE_S = 2.0
STOP_POLL_S = 0.005


def maintenance_interval(settings: Settings) -> float:
    timeouts = [
        t
        for t in (settings.query_wait_timeout, settings.server_idle_timeout, settings.client_login_timeout)
        if t > 0
    ]
    if not timeouts:
        return MAINTENANCE_MAX_INTERVAL
    return min(MAINTENANCE_MAX_INTERVAL, max(MAINTENANCE_MIN_INTERVAL, min(timeouts) / 10))


class Pooler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = Authenticator.from_settings(settings)
        self.manager = PoolManager(settings, stored_secret=self.auth.stored_secret)
        if settings.auth_user:
            self.auth.query = self.manager.run_auth_query
        self.registry = ClientRegistry(
            settings, self.manager, auth=self.auth, tls=client_tls(settings)
        )
        self._listener: asyncio.Server | None = None
        self._maintenance: asyncio.TimerHandle | None = None
        self.port = settings.listen_port
        self.metrics = MetricsServer(self.manager, self.registry)
        self._snapshots: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.settings.metrics_port is not None:
            await self.metrics.start(self.settings.metrics_addr, self.settings.metrics_port)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: ClientConnection(self.registry),
            self.settings.listen_addr,
            self.settings.listen_port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
        )
        sockets = self._listener.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._schedule_maintenance()
        self._schedule_snapshots()
        self.metrics.listening = True
        # Warn now if the configured bounds cannot fit the servers (needs forced users).
        self._background(advisor.check_capacity(self.manager, self.settings))
        if self.settings.auth_type == "trust" and not _is_loopback(self.settings.listen_addr):
            log.warning(
                "auth_type is trust on %s: anyone who can reach this port logs in as any user",
                self.settings.listen_addr,
            )
        log.info(
            "listening on %s:%d (pool_mode=%s, %d database entries)",
            self.settings.listen_addr, self.port, self.settings.pool_mode,
            len(self.settings.databases),
        )

    def _schedule_maintenance(self) -> None:
        loop = asyncio.get_running_loop()
        self._maintenance = loop.call_later(maintenance_interval(self.settings), self._maintain)

    def _maintain(self) -> None:
        try:
            self.manager.expire()
            self.registry.expire_logins(time.monotonic_ns())
        except Exception:  # maintenance must never stop running
            log.exception("maintenance pass failed")
        self._schedule_maintenance()

    def _schedule_snapshots(self) -> None:
        loop = asyncio.get_running_loop()
        self._snapshots = loop.call_later(self.settings.stats_period, self._snapshot)

    def _snapshot(self) -> None:
        self.manager.take_snapshots()
        self._schedule_snapshots()

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop listening, end every client and server connection."""
        for task in self._tasks:
            task.cancel()
        if self._snapshots is not None:
            self._snapshots.cancel()
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self._listener is not None:
            self._listener.close()
        self.registry.accepting = False
        for client in list(self.registry.clients):
            client.transport.close()
        self.manager.close()
        if self._listener is not None:
            await self._listener.wait_closed()
        # Let every transport really close (TLS closes take round trips) before the loop may be
        # closed: a transport still open then makes uvloop refuse to close the loop.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_S
        await self.manager.wait_closed(deadline)
        while self.registry.clients and loop.time() < deadline:
            await asyncio.sleep(STOP_POLL_S)
        for client in list(self.registry.clients):
            client.transport.abort()
        await self.metrics.stop()
        await asyncio.sleep(0)  # let connection_lost callbacks run


def check_files(settings: Settings) -> None:
    """Load everything the settings name (auth_file, hba, certificates) as `Pooler` would;
    ConfigError listing every problem."""
    problems: list[str] = []
    for load in (Authenticator.from_settings, client_tls, server_ssl_context):
        try:
            load(settings)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
