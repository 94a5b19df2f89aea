"""Wiring: the listener, the pools, the maintenance timers, the admin console, reload and shutdown.

`Pooler` is what `pypooler run` (and the tests) start: it owns the listening socket, the
`Authenticator` (auth_file, hba, auth_query), the TLS contexts, the `PoolManager`, the
`ClientRegistry`, the `AdminConsole`, one periodic maintenance callback (query_wait_timeout,
server_idle_timeout, client_login_timeout) shared by every pool and client, so no per-client
timers exist on the hot path, and one stats-snapshot callback every `stats_period` (averages,
rates, advice). Building a `Pooler` loads every file the settings name and raises `ConfigError`
(one line per problem) if any is unusable; a reload does the same and keeps the old ones then.

Reload and shutdown are methods here so every trigger shares one code path (SIGHUP and the admin
console's RELOAD call `reload()`; SIGTERM, SIGINT and SHUTDOWN call `drain()` then `stop()`):
- `reload()` never drops a client: settings apply to the next checkout, a changed server login
  or a smaller pool closes servers as their transactions release them, and the listening and
  metrics addresses (which would need a new socket) stay until a restart, with a warning.
- `drain()` is PgBouncer's "wait for servers" shutdown, per client: stop accepting, close
  clients that are between transactions at once (safe: nothing of theirs is running, and they
  reconnect elsewhere), refuse new transactions with SQLSTATE 57P01, let transactions already
  running finish, and close each such client as its transaction ends. It returns when no client
  is left inside a transaction, or at the timeout; `stop()` then closes whatever is left.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pypooler import advisor
from pypooler.admin import AdminConsole
from pypooler.auth import Authenticator
from pypooler.client import ClientConnection, ClientRegistry
from pypooler.config import RESTART_ONLY_SETTINGS, ConfigError, Settings
from pypooler.metrics import MetricsServer
from pypooler.pool import PoolManager, shutdown_refused
from pypooler.protocol import codec
from pypooler.protocol.transaction import releasable
from pypooler.tls import client_tls, server_ssl_context

log = logging.getLogger("pypooler")

# Seconds between maintenance passes: a tenth of the shortest timeout, kept within these bounds.
MAINTENANCE_MIN_INTERVAL = 0.05
MAINTENANCE_MAX_INTERVAL = 1.0
LISTEN_BACKLOG = 4096  # serverless bursts open many connections at once
# How long stop() waits for connections to close cleanly before aborting them.
STOP_GRACE_S = 2.0
STOP_POLL_S = 0.005
# How often a drain looks for clients whose transaction ended; a client waits at most this long
# past its commit to be closed, and nothing is added to the hot path.
DRAIN_POLL_S = 0.05


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
    def __init__(
        self,
        settings: Settings,
        reload_settings: Callable[[], Settings] | None = None,
        *,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        """`reload_settings`: how reload() re-reads the configuration (the CLI re-reads its file
        and the environment; it raises ConfigError). `on_shutdown`: what the console's SHUTDOWN
        triggers (the CLI's drain); without it SHUTDOWN stops the pooler at once."""
        self.settings = settings
        self.reload_settings = reload_settings
        self.on_shutdown = on_shutdown
        self.draining = False
        self.auth = Authenticator.from_settings(settings)
        self.manager = PoolManager(settings, stored_secret=self.auth.stored_secret)
        if settings.auth_user:
            self.auth.query = self.manager.run_auth_query
        self.auth.log_limiter = self.manager.log_limiter
        self.registry = ClientRegistry(
            settings, self.manager, auth=self.auth, tls=client_tls(settings)
        )
        self.console = AdminConsole(self.registry)
        self.registry.admin_login = self.console.login
        self.registry.reload = self._reload_for_console
        self.registry.shutdown = self.request_shutdown
        self._listener: asyncio.Server | None = None
        self._maintenance: asyncio.TimerHandle | None = None
        self._snapshots: asyncio.TimerHandle | None = None
        self._stopping = False
        self.port = settings.listen_port
        self.metrics = MetricsServer(self.manager, self.registry)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self.settings.metrics_port is not None:
            await self.metrics.start(self.settings.metrics_addr, self.settings.metrics_port)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            # A C-level partial: no interpreted frame per accepted connection.
            functools.partial(ClientConnection, self.registry),
            self.settings.listen_addr,
            self.settings.listen_port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
        )
        sockets = self._listener.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        if self.settings.tcp_keepalive:
            # Accepted sockets inherit SO_KEEPALIVE from the listener (Linux): one setsockopt
            # here instead of a socket object and a syscall per client connection.
            for sock in sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
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
            "listening on %s:%d (pool_mode=%s, %d database entries, %s build)",
            self.settings.listen_addr, self.port, self.settings.pool_mode,
            len(self.settings.databases), "compiled" if codec.NATIVE else "pure-Python",
        )
        if not codec.NATIVE and not os.environ.get("PYPOOLER_PURE"):
            log.warning(
                "running the pure-Python build, whose hot path is slower: this install was made"
                " without a C compiler (or from a source checkout not yet compiled: make compile)"
            )

    def _schedule_maintenance(self) -> None:
        loop = asyncio.get_running_loop()
        self._maintenance = loop.call_later(maintenance_interval(self.settings), self._maintain)

    def _maintain(self) -> None:
        try:
            self.manager.expire()
            self.registry.expire_logins(time.monotonic_ns())
            self.manager.log_limiter.flush()  # summaries of lines suppressed a while ago
        except Exception:  # maintenance must never stop running
            log.exception("maintenance pass failed")
        self._schedule_maintenance()

    def _schedule_snapshots(self) -> None:
        loop = asyncio.get_running_loop()
        self._snapshots = loop.call_later(self.settings.stats_period, self._take_snapshots)

    def _take_snapshots(self) -> None:
        try:
            self.manager.take_snapshots()
        except Exception:  # snapshots must never stop being taken
            log.exception("stats snapshot failed")
        self._schedule_snapshots()

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ reload

    def _reload_for_console(self) -> None:
        """RELOAD on the admin console: like SIGHUP, but problems go back to the console user."""
        self.reload(raise_errors=True)

    def reload(self, new: Settings | None = None, *, raise_errors: bool = False) -> bool:
        """Apply a new configuration without dropping clients; False (old config kept, every
        problem logged, or raised as ConfigError with `raise_errors`) if it cannot be read."""
        if new is None:
            if self.reload_settings is None:
                if raise_errors:
                    raise ConfigError(["pypooler was started without a configuration source to re-read"])
                log.warning("reload: no configuration source to re-read")
                return False
            try:
                new = self.reload_settings()
            except ConfigError as exc:
                if raise_errors:
                    raise
                for problem in exc.problems:
                    log.error("reload failed, old configuration kept: %s", problem)
                return False
        try:
            # Every file the new settings name, loaded before anything changes.
            auth = Authenticator.from_settings(new)
            tls = client_tls(new)
            server_tls = server_ssl_context(new)
        except ConfigError as exc:
            if raise_errors:
                raise
            for problem in exc.problems:
                log.error("reload failed, old configuration kept: %s", problem)
            return False
        old = self.settings
        kept = {name: getattr(old, name) for name in RESTART_ONLY_SETTINGS}
        for name, value in kept.items():
            if getattr(new, name) != value:
                log.warning(
                    "reload: %s stays %r until a restart (the file says %r)", name, value, getattr(new, name)
                )
        new = new.model_copy(update=kept)
        changes = [
            f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}"
            for name in type(new).model_fields
            if name != "databases" and getattr(old, name) != getattr(new, name)
        ]
        added = sorted(set(new.databases) - set(old.databases))
        removed = sorted(set(old.databases) - set(new.databases))
        changed = sorted(
            name
            for name in set(old.databases) & set(new.databases)
            if old.databases[name] != new.databases[name]
        )
        changes += [f"database {name} added" for name in added]
        changes += [f"database {name} removed (its connected clients stay)" for name in removed]
        changes += [f"database {name} changed" for name in changed]
        self.settings = new
        self.registry.settings = new
        if new.auth_user:
            auth.query = self.manager.run_auth_query
        auth.log_limiter = self.manager.log_limiter
        self.auth = self.registry.auth = auth
        self.registry.tls = tls
        changes += self.manager.reload(new, stored_secret=auth.stored_secret, server_tls=server_tls)
        if new.log_level != old.log_level:
            logging.getLogger("pypooler").setLevel(new.log_level)
        if new.stats_period != old.stats_period and self._snapshots is not None:
            self._snapshots.cancel()
            self._schedule_snapshots()
        log.info("reloaded configuration: %s", "; ".join(changes) or "no changes")
        if self._listener is not None and not self.draining:
            self._background(advisor.check_capacity(self.manager, new))
        return True

    # ------------------------------------------------------------------ shutdown

    async def drain(self, timeout: float) -> int:
        """Stop accepting, refuse new transactions, let running ones finish for up to
        `timeout` seconds; return how many clients were still inside one at the end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.draining = True
        self.metrics.draining = True
        self.registry.accepting = False
        if self._listener is not None:
            self._listener.close()
        self.manager.drain()
        log.info(
            "draining: %d clients, %d inside a transaction; up to %g s",
            len(self.registry.clients), self._close_clients_at_rest(), timeout,
        )
        while True:
            busy = self._close_clients_at_rest()
            if not busy:
                log.info("drained: no transaction running")
                return 0
            if loop.time() >= deadline:
                log.warning("drain timeout (%g s): closing %d clients inside a transaction", timeout, busy)
                return busy
            await asyncio.sleep(DRAIN_POLL_S)

    def _close_clients_at_rest(self) -> int:
        """Close every client that has no transaction running; return how many do."""
        busy = 0
        for client in list(self.registry.clients):
            if client.closed:
                continue
            server = client.server
            if server is None:
                client.fail(shutdown_refused())  # logging in, or between transactions
            elif client.mode == "session" and releasable(client.frontend, server.backend):
                # A session between transactions: its server could go back, were it not kept.
                client.fail(shutdown_refused())
            else:
                busy += 1
        return busy

    def request_shutdown(self) -> None:
        """SHUTDOWN on the admin console."""
        if self.on_shutdown is not None:
            self.on_shutdown()
        else:
            asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        """Stop listening, end every client and server connection."""
        if self._stopping:
            return
        self._stopping = True
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
