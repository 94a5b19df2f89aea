"""Wiring: the listener, the pools, the maintenance timer and orderly shutdown.

`Pooler` is what `pypooler run` (and the tests) start: it owns the listening socket, the
`PoolManager`, the `ClientRegistry`, and one periodic maintenance callback (query_wait_timeout,
server_idle_timeout) shared by every pool, so no per-client timers exist on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from pypooler import advisor
from pypooler.client import ClientConnection, ClientRegistry
from pypooler.config import Settings
from pypooler.metrics import MetricsServer
from pypooler.pool import PoolManager

log = logging.getLogger("pypooler")

# Seconds between maintenance passes: a tenth of the shortest timeout, kept within these bounds.
MAINTENANCE_MIN_INTERVAL = 0.05
MAINTENANCE_MAX_INTERVAL = 1.0
LISTEN_BACKLOG = 4096  # serverless bursts open many connections at once


def maintenance_interval(settings: Settings) -> float:
    timeouts = [t for t in (settings.query_wait_timeout, settings.server_idle_timeout) if t > 0]
    if not timeouts:
        return MAINTENANCE_MAX_INTERVAL
    return min(MAINTENANCE_MAX_INTERVAL, max(MAINTENANCE_MIN_INTERVAL, min(timeouts) / 10))


class Pooler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager = PoolManager(settings)
        self.registry = ClientRegistry(settings, self.manager)
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
        await self.metrics.stop()
        await asyncio.sleep(0)  # let connection_lost callbacks run
