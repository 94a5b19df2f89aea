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

from pypooler.auth import Authenticator
from pypooler.client import ClientConnection, ClientRegistry
from pypooler.config import ConfigError, Settings
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
        # Let every transport really close (TLS closes take round trips) before the loop may be
        # closed: a transport still open then makes uvloop refuse to close the loop.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_S
        await self.manager.wait_closed(deadline)
        while self.registry.clients and loop.time() < deadline:
            await asyncio.sleep(STOP_POLL_S)
        for client in list(self.registry.clients):
            client.transport.abort()
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
