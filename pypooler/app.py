"""Wiring: the listener, the pools, the maintenance timers, the admin console and shutdown.

`Pooler` is what `pypooler run` (and the tests) start: it owns the listening socket, the
`PoolManager`, the `ClientRegistry`, the `AdminConsole`, one periodic maintenance callback
(query_wait_timeout, server_idle_timeout) shared by every pool, so no per-client timers exist on
the hot path, and one stats-snapshot callback every `stats_period` (averages, rates, advice).

It implements the registry's hooks for the console: RELOAD re-reads the configuration through
`reload_settings` (the old one stays if the new one has errors) and SHUTDOWN calls
`on_shutdown` (the CLI's stop event) or, without one, stops the pooler itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pypooler.admin import AdminConsole
from pypooler.client import ClientConnection, ClientRegistry
from pypooler.config import RESTART_ONLY_SETTINGS, ConfigError, Settings
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
    def __init__(
        self,
        settings: Settings,
        *,
        reload_settings: Callable[[], Settings] | None = None,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        # Re-reads the configuration for RELOAD / SIGHUP (raising ConfigError); None: no source.
        self.reload_settings = reload_settings
        self.on_shutdown = on_shutdown
        self.manager = PoolManager(settings)
        self.registry = ClientRegistry(settings, self.manager)
        self.console = AdminConsole(self.registry)
        self.registry.admin_login = self.console.login
        self.registry.reload = self.reload
        self.registry.shutdown = self.request_shutdown
        self._listener: asyncio.Server | None = None
        self._maintenance: asyncio.TimerHandle | None = None
        self._snapshots: asyncio.TimerHandle | None = None
        self._stopping = False
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
        self._schedule_snapshots()
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
        self._snapshots = loop.call_later(self.settings.stats_period, self._take_snapshots)

    def _take_snapshots(self) -> None:
        try:
            self.manager.take_snapshots()
        except Exception:
            log.exception("stats snapshot failed")
        self._schedule_snapshots()

    # ------------------------------------------------------------------ admin hooks

    def reload(self) -> None:
        """Re-read the configuration and apply it; ConfigError leaves everything as it was."""
        if self.reload_settings is None:
            raise ConfigError(["pypooler was started without a configuration source to re-read"])
        settings = self.reload_settings()
        # The listening sockets stay as they are until a restart; show what is in force.
        kept = {
            name: getattr(self.settings, name)
            for name in RESTART_ONLY_SETTINGS
            if getattr(settings, name) != getattr(self.settings, name)
        }
        for name in sorted(kept):
            log.warning("RELOAD: %s changed; it takes effect at the next start", name)
        if kept:
            settings = settings.model_copy(update=kept)
        period_changed = settings.stats_period != self.settings.stats_period
        self.settings = self.registry.settings = settings
        self.manager.apply_settings(settings)
        if period_changed and self._snapshots is not None:
            self._snapshots.cancel()
            self._schedule_snapshots()
        log.info(
            "configuration reloaded: %d database entries, pool_mode=%s, default_pool_size=%d",
            len(settings.databases), settings.pool_mode, settings.default_pool_size,
        )

    def request_shutdown(self) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        else:
            asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        """Stop listening, end every client and server connection."""
        if self._stopping:
            return
        self._stopping = True
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
        await asyncio.sleep(0)  # let connection_lost callbacks run
