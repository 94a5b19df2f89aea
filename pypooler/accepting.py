"""Accepting client connections, and what running out of file descriptors does to it.

Every client and every server connection is a file descriptor, and a pooler is the process
that holds the most of them. The rules kept here:

- At start the soft RLIMIT_NOFILE is raised to the hard limit (`raise_descriptor_limit`), and
  the limit in force is logged.
- The descriptor budget (`descriptors_needed`): max_client_conn (admin console sessions are
  clients too), plus the server bound, plus `FIXED_MARGIN`. The server bound is, per
  `[databases]` entry, its pool_size plus one listener connection (listening.py); a forced-user
  entry has exactly that one pool, while an entry without a forced user (and the "*" fallback)
  has one pool per user, counted here as one pool: the budget is then a lower estimate.
  `FIXED_MARGIN` covers the listening sockets, /metrics connections, cancel requests in
  flight, the admin console's sessions beyond max_client_conn (registry.py's CONSOLE_RESERVE),
  the event loop's own descriptors and the log stream. When the budget does not fit in
  the soft limit pypooler warns at start and on RELOAD (`check_descriptor_budget`).
- Where the budget fits the limit, the event loop accepts (`LoopAcceptor`: uvloop's accept in
  C, the cheapest there is, which matters to a client that connects per request). Where it does
  not (the case warned about above), accepting is pypooler's own (`Acceptor`): uvloop (libuv)
  answers an accept() that fails for want of descriptors by accepting and closing the waiting
  connections with nothing reported, and asyncio reports each failure through the loop's
  exception handler once a second. With `Acceptor` such a failure (EMFILE, ENFILE, ENOBUFS, ENOMEM) is counted
  (`ClientRegistry.accept_failures`, /metrics `pypooler_accept_failures_total`, SHOW LISTS),
  logged through the log limiter, and accepting pauses: new clients wait in the listen backlog
  instead of being dropped, and the maintenance pass resumes accepting on its next pass
  (`Acceptor.resume`), so clients are served again as soon as others leave.
- Beside TCP, a unix-domain socket `.s.PGSQL.<port>` in `unix_socket_dir` (PgBouncer's and
  libpq's naming, so `psql -h DIR -p PORT` finds it), made with `unix_socket_mode` and
  `unix_socket_group` (`bind_unix_socket`). A socket file left by a pooler that died is
  replaced; one that still answers is an error. The file is removed when the listener closes
  (`remove_unix_socket`). Both kinds of socket go through the same acceptor.
- Accepting is not the forwarding path: an accepted socket becomes a transport through
  `loop.connect_accepted_socket`, and from there on nothing differs from the loop's own server.
  It costs more per connection than uvloop's accept in C (see bench/README.md): the price of
  seeing the failures, paid only where they can happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable

from pypooler.config import Settings
from pypooler.log_limits import LogLimiter

log = logging.getLogger("pypooler.accepting")

# Descriptors besides clients and servers: listening sockets, /metrics connections, cancel
# requests in flight, the loop's epoll/eventfd/signal descriptors, stdio and the log stream.
FIXED_MARGIN = 32
# accept() errors that mean "no descriptor (or memory) for one more connection".
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Connections accepted per readiness callback, so a burst cannot starve established clients.
ACCEPTS_PER_WAKEUP = 64


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite soft limit for descriptors: fs.nr_open is the real ceiling.
    target = hard if hard != resource.RLIM_INFINITY else _nr_open(soft)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def _nr_open(fallback: int) -> int:
    try:
        with open("/proc/sys/fs/nr_open") as nr_open:
            return int(nr_open.read())
    except (OSError, ValueError):
        return fallback


def descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft


def server_bound(settings: Settings) -> int:
    """Server connections the configured pools can hold (see the module rules)."""
    return sum(settings.pool_size_of(db, db.user or "") + 1 for db in settings.databases.values())


def descriptors_needed(settings: Settings) -> int:
    """max_client_conn + the server bound + FIXED_MARGIN (see the module rules)."""
    return settings.max_client_conn + server_bound(settings) + FIXED_MARGIN


def check_descriptor_budget(settings: Settings, limit: int | None = None) -> str | None:
    """The warning line (also logged) when the budget does not fit in the soft limit."""
    limit = descriptor_limit() if limit is None else limit
    needed = descriptors_needed(settings)
    if limit == resource.RLIM_INFINITY or needed <= limit:
        return None
    line = (
        f"open files limit {limit} is below what the configuration may need: max_client_conn"
        f" {settings.max_client_conn} + server connections {server_bound(settings)} + margin"
        f" {FIXED_MARGIN} = {needed}; past the limit new clients wait in the listen backlog"
        " (raise `ulimit -n`/LimitNOFILE, or lower max_client_conn)"
    )
    log.warning("%s", line)
    return line


async def bind_listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets for every address `host` resolves to (as the loop's own
    create_server would make them); `*` is every address, IPv4 and IPv6, as in PgBouncer."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        None if host == "*" else host,
        port,
        family=socket.AF_UNSPEC,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: no v4-mapped addresses on the v6 one.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def unix_socket_path(directory: str, port: int) -> str:
    return os.path.join(directory, f".s.PGSQL.{port}")


def bind_unix_socket(directory: str, port: int, mode: int, group: str, backlog: int) -> socket.socket:
    """A non-blocking listening unix-domain socket for `port` in `directory` (see the module
    rules); OSError with a readable message when it cannot be made."""
    path = unix_socket_path(directory, port)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
        try:
            if group:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, mode)
        except KeyError:
            raise OSError(errno.EINVAL, f"unix_socket_group {group!r}: no such group") from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


def _remove_stale(path: str) -> None:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"cannot listen on {path}: a file that is not a socket is there")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a pooler that did not exit cleanly
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"cannot listen on {path}: another server is listening there")


def unix_socket_files(sockets: list[socket.socket]) -> list[str]:
    """The files of the unix-domain sockets among `sockets` (asked before they are closed)."""
    return [sock.getsockname() for sock in sockets if sock.family == socket.AF_UNIX]


def remove_unix_sockets(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


class LoopAcceptor:
    """The event loop's own server on `sockets` (see the module rules); never pauses."""

    def __init__(
        self, sockets: list[socket.socket], protocol_factory: Callable[[], asyncio.Protocol], backlog: int
    ) -> None:
        self.sockets = sockets
        self.protocol_factory = protocol_factory
        self.backlog = backlog  # create_server listens again, with 100 unless told
        self.paused = False
        self._servers: list[asyncio.Server] = []
        self._files = unix_socket_files(sockets)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            server = await loop.create_server(self.protocol_factory, sock=sock, backlog=self.backlog)
            self._servers.append(server)

    def resume(self) -> None:
        pass

    def close(self) -> None:
        """Stop accepting and close the listening sockets (connections already made stay)."""
        for server in self._servers:
            server.close()
        self._servers = []
        remove_unix_sockets(self._files)


class Acceptor:
    """Accepts on `sockets` and hands each connection to `protocol_factory` (see the module
    rules). `on_failure(exc)` is called once per accept() that ran out of descriptors."""

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        log_limiter: LogLimiter,
        on_failure: Callable[[OSError], None],
        describe: Callable[[], str] = lambda: "",
    ) -> None:
        self.sockets = sockets
        self.protocol_factory = protocol_factory
        self.log_limiter = log_limiter
        self.on_failure = on_failure
        self.describe = describe  # what is open, for the log line
        self._files = unix_socket_files(sockets)
        self.paused = False
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._connecting: set[asyncio.Task[object]] = set()

    async def start(self) -> None:  # async as LoopAcceptor.start: one interface for app.py
        self._watch()

    def _watch(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)

    def _accept_ready(self, sock: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up before we took it
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(exc)
                else:
                    self.log_limiter.log(
                        log, logging.WARNING, ("accept_failed", exc.errno),
                        "cannot accept a client connection: %s", exc,
                    )  # fmt: skip
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self.protocol_factory, conn))
            self._connecting.add(task)
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log_limiter.log(
                log, logging.WARNING, ("accept_failed", "transport"),
                "cannot set up an accepted client connection: %s", task.exception(),
            )  # fmt: skip

    def _out_of_descriptors(self, exc: OSError) -> None:
        self.on_failure(exc)
        self.log_limiter.log(
            log, logging.WARNING, ("accept_failed", exc.errno),
            "cannot accept a client connection: %s (%s; soft open files limit %d): new clients"
            " wait in the listen backlog until connections close",
            exc.strerror or exc, self.describe(), descriptor_limit(),
        )  # fmt: skip
        self._pause()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())

    def resume(self) -> None:
        """Accept again after a pause (called by the maintenance pass); a failure pauses again."""
        if self.paused and not self.closed:
            self.paused = False
            self._watch()

    def close(self) -> None:
        """Stop accepting and close the listening sockets (connections already made stay)."""
        if self.closed:
            return
        self.closed = True
        if not self.paused:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
        for sock in self.sockets:
            sock.close()
        remove_unix_sockets(self._files)
        for task in self._connecting:
            task.cancel()
