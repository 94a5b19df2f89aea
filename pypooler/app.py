"""Wiring: the listener, the pools, the maintenance timer and orderly shutdown.

`Pooler` is what `pypooler run` (and the tests) start: it owns the listening socket, the
`PoolManager`, the `ClientRegistry`, and one periodic maintenance callback (query_wait_timeout,
server_idle_timeout) shared by every pool, so no per-client timers exist on the hot path.
"""

from __future__ import annotations

import asyncio
import logging

from pypooler.client import ClientConnection, ClientRegistry
from pypooler.config import Settings
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

    async def start(self) -> None:
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

    async def stop(self) -> None:
        """Stop listening, end every client and server connection."""
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
        await asyncio.sleep(0)  # let connection_lost callbacks run
