"""Wiring: the listener, the pools, the maintenance timers, the admin console, reload and shutdown.

`Pooler` is what `pypooler run` (and the tests) start: it owns the listening socket, the
`Authenticator` (auth_file, hba, auth_query), the TLS contexts, the `PoolManager`, the
`ClientRegistry`, the `AdminConsole` and the `Maintenance` pass (maintenance.py: every timeout
and periodic job, stats snapshots included, so no per-client timers exist on the hot path).
Accepting is accepting.py's (the open files limit, the descriptor budget, accept failures).
Building a `Pooler` loads every file the settings name and raises `ConfigError`
(one line per problem) if any is unusable; a reload does the same and keeps the old ones then.

Reload and shutdown are methods here so every trigger shares one code path (SIGHUP and the admin
console's RELOAD call `reload()`; SIGTERM, SIGINT and SHUTDOWN call `drain()` then `stop()`):
- `reload()` never drops a client: settings apply to the next checkout, a changed server login
  or a smaller pool closes servers as their transactions release them, and the listening and
  metrics addresses (which would need a new socket) stay until a restart, with a warning.
- `drain()` is PgBouncer's "wait for servers" shutdown, per client: stop accepting, close
  clients that are between transactions at once (safe: nothing of theirs is running, and they
  reconnect elsewhere), refuse new transactions with SQLSTATE 57P01, let transactions already
  running finish, and close each such client as its transaction ends. A client "between
  transactions" is one holding no server, or one keeping its server (session mode, or pinned by
  session_state_policy = "pin") with nothing outstanding and no transaction open. It returns
  when no client is left inside a transaction, or at the timeout; `stop()` then ends whatever is
  left, each client with PostgreSQL's FATAL 57P01 "terminating connection due to administrator
  command" (SIGINT's fast drain and a second signal too), never a bare close, unless a
  server message is half forwarded to it (an error cannot follow half a message).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from pypooler import advisor
from pypooler.accepting import (
    Acceptor,
    LoopAcceptor,
    bind_listening_sockets,
    bind_unix_socket,
    check_descriptor_budget,
    raise_descriptor_limit,
)
from pypooler.activity import ActivityWatch
from pypooler.admin import AdminConsole
from pypooler.auth import Authenticator
from pypooler.client import ClientConnection
from pypooler.config import RESTART_ONLY_SETTINGS, ConfigError, Settings
from pypooler.http_listener import HttpListener
from pypooler.keepalive import apply_keepalive, keepalive_options
from pypooler.maintenance import Maintenance
from pypooler.metrics import HolderCollector, MetricsServer
from pypooler.pool import PoolManager, shutdown_refused
from pypooler.protocol import codec
from pypooler.protocol.errors import ShuttingDown
from pypooler.protocol.transaction import releasable
from pypooler.registry import ClientRegistry
from pypooler.tls import client_tls, server_ssl_context

log = logging.getLogger("pypooler")

# How long stop() waits for connections to close cleanly before aborting them.
STOP_GRACE_S = 2.0
STOP_POLL_S = 0.005
# How often a drain looks for clients whose transaction ended; a client waits at most this long
# past its commit to be closed, and nothing is added to the hot path.
DRAIN_POLL_S = 0.05


def administrator_terminated() -> ShuttingDown:
    """How a shutdown ends a client it cannot wait for any longer: PostgreSQL's own words for
    a backend ended by the administrator (SQLSTATE 57P01), which drivers take as "reconnect"."""
    return ShuttingDown("terminating connection due to administrator command")


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
        self.auth.query = self.manager.run_auth_query  # used where a database has an auth_user
        self.auth.log_limiter = self.manager.log_limiter
        self.registry = ClientRegistry(settings, self.manager, auth=self.auth, tls=client_tls(settings))
        # The advisor's questions to PostgreSQL: started by the pass, read by the console and /metrics.
        self.activity = ActivityWatch(settings.server_connect_timeout, log_limiter=self.manager.log_limiter)
        self.console = AdminConsole(self.registry, self.activity)
        self.registry.admin_login = self.console.login
        self.registry.reload = self._reload_for_console
        self.registry.shutdown = self.request_shutdown
        self._acceptor: Acceptor | LoopAcceptor | None = None
        self.http = HttpListener(self)  # started only if http_listen_addr is set
        self.http_port: int | None = None
        self.maintenance = Maintenance(
            self.manager, self.registry, settings, resume_accepting=self._resume_accepting,
            activity=self.activity, expire_http=self.http.expire,
        )  # fmt: skip
        self._stopped: asyncio.Future[None] | None = None  # set once stop() has begun
        self.port = settings.listen_port
        self.metrics = MetricsServer(self.manager, self.registry)
        self.metrics.prometheus.register(HolderCollector(self.manager, self.activity.reports))
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        # Before any socket is opened: every client and server connection is a descriptor.
        limit = raise_descriptor_limit()
        log.info("open files limit: %d", limit)
        scarce = check_descriptor_budget(self.settings, limit) is not None
        if self.settings.metrics_port is not None:
            await self.metrics.start(self.settings.metrics_addr, self.settings.metrics_port)
        settings = self.settings
        backlog = settings.listen_backlog
        sockets = await bind_listening_sockets(settings.listen_addr, settings.listen_port, backlog)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        if settings.unix_socket_dir:
            directory, mode, group = (
                settings.unix_socket_dir,
                settings.unix_socket_mode,
                settings.unix_socket_group,
            )
            try:
                sockets.append(bind_unix_socket(directory, self.port, mode, group, backlog))
            except BaseException:
                for sock in sockets:
                    sock.close()
                raise
        # A C-level partial: no interpreted frame per accepted connection.
        factory = functools.partial(ClientConnection, self.registry)
        # Our own accept only where descriptors may run out (see accepting.py).
        self._acceptor = (
            Acceptor(
                sockets,
                factory,
                log_limiter=self.manager.log_limiter,
                on_failure=self._accept_failed,
                describe=self._describe_connections,
            )
            if scarce
            else LoopAcceptor(sockets, factory, backlog)
        )
        options = keepalive_options(settings)
        for sock in sockets:
            apply_keepalive(sock, options)  # accepted sockets inherit them (keepalive.py)
        await self._acceptor.start()
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                log.info("listening on unix socket %s", sock.getsockname())
        if settings.http_listen_addr:
            await self.http.start(settings.http_listen_addr, settings.http_listen_port)
            self.http_port = self.http.port
        self.manager.make_min_pools()
        self.maintenance.start()
        self.metrics.listening = True
        # Warn now if the configured bounds cannot fit the servers (needs forced users).
        self._background(advisor.check_capacity(self.manager, self.settings, self.activity))
        if self.settings.auth_type == "trust" and not _is_loopback(self.settings.listen_addr):
            log.warning(
                "auth_type is trust on %s: anyone who can reach this port logs in as any user",
                self.settings.listen_addr,
            )
        log.info(
            "listening on %s:%d (pool_mode=%s, %d database entries, %s build)",
            self.settings.listen_addr,
            self.port,
            self.settings.pool_mode,
            len(self.settings.databases),
            "compiled" if codec.NATIVE else "pure-Python",
        )
        if not codec.NATIVE and not os.environ.get("PYPOOLER_PURE"):
            log.warning(
                "running the pure-Python build, whose hot path is slower: this install was made"
                " without a C compiler (or from a source checkout not yet compiled: make compile)"
            )

    def _accept_failed(self, exc: OSError) -> None:
        self.registry.accept_failures += 1

    def _describe_connections(self) -> str:
        servers = sum(pool.occupied for pool in self.manager.pools.values())
        return f"{len(self.registry.clients)} clients and {servers} servers open"

    def _resume_accepting(self) -> None:
        """The maintenance pass: accept again after running out of descriptors (not while
        draining, when the sockets are closed)."""
        acceptor = self._acceptor
        if acceptor is not None and acceptor.paused and not self.draining:
            acceptor.resume()

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
        auth.query = self.manager.run_auth_query
        auth.log_limiter = self.manager.log_limiter
        self.auth = self.registry.auth = auth
        self.registry.tls = tls
        changes += self.manager.reload(new, stored_secret=auth.stored_secret, server_tls=server_tls)
        self.manager.make_min_pools()
        if new.log_level != old.log_level:
            logging.getLogger("pypooler").setLevel(new.log_level)
        self.maintenance.reload(new)  # a new interval, and the stats_period
        self.activity.connect_timeout = new.server_connect_timeout
        if keepalive_options(new) != keepalive_options(old) and self._acceptor and not self.draining:
            options = keepalive_options(new, resetting=True)
            for sock in self._acceptor.sockets:
                apply_keepalive(sock, options)
        log.info("reloaded configuration: %s", "; ".join(changes) or "no changes")
        if self._acceptor is not None and not self.draining:
            check_descriptor_budget(new)
            self._background(advisor.check_capacity(self.manager, new, self.activity))
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
        if self._acceptor is not None:
            self._acceptor.close()
        self.manager.drain()
        log.info(
            "draining: %d clients, %d inside a transaction; up to %g s",
            len(self.registry.clients),
            self._close_clients_at_rest(),
            timeout,
        )
        while True:
            busy = self._close_clients_at_rest()
            if not busy:
                log.info("drained: no transaction running")
                return 0
            if loop.time() >= deadline:
                log.warning("drain timeout (%g s): closing %d clients inside a transaction", timeout, busy)
                self._terminate_clients()
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
            elif (client.mode == "session" or client.pinned) and releasable(client.frontend, server.backend):
                # A session (or a pinned client) between transactions: its server could go
                # back, were it not kept.
                client.fail(shutdown_refused())
            else:
                busy += 1
        return busy

    def _terminate_clients(self) -> None:
        """End every client still connected with FATAL 57P01 (see the module docstring); their
        servers are closed as they go (PostgreSQL rolls back what was running)."""
        for client in list(self.registry.clients):
            client.terminate(administrator_terminated())

    def request_shutdown(self) -> None:
        """SHUTDOWN on the admin console."""
        if self.on_shutdown is not None:
            self.on_shutdown()
        else:
            asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        """Stop listening, end every client and server connection. A second call (SHUTDOWN
        on the console, then the owner's own stop) waits for the first to finish."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
            return
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            await self._stop()
        finally:
            self._stopped.set_result(None)

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.maintenance.stop()
        self.activity.close()
        if self._acceptor is not None:
            self._acceptor.close()
        self.registry.accepting = False
        await self.http.close()
        self._terminate_clients()
        self.manager.close()
        # Let every transport really close (TLS closes take round trips) before the loop may be
        # closed: a transport still open then makes uvloop refuse to close the loop.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_S
        await self.manager.wait_closed(deadline)
        while self.registry.clients and loop.time() < deadline:
            await asyncio.sleep(STOP_POLL_S)
        for client in list(self.registry.clients):
            client.transport.abort()
        await asyncio.sleep(0)  # their connection_lost: the servers they held are closed
        await self.manager.wait_closed(loop.time())  # past its deadline: aborts what is still open
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
