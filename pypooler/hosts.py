"""Several servers behind one [databases] entry: which to try, in what order, which to skip.

The rules kept here:
- `host = "a,b,c"` (and `port` one for all, or one per host) lists the servers of an entry.
  With `load_balance_hosts = "round-robin"` (PgBouncer's behaviour with a host list) each new
  server connection starts at the next host; with "disable" every connection tries them in the
  order written (the first that works: failover).
- A host whose connect failed (refused, unreachable, timed out) is tried last for
  `host_down_timeout` seconds, so new connections do not wait on it first; when every host is
  down they are all tried anyway.
- `target_session_attrs` ("any", "read-write", "read-only") is checked after login from what
  PostgreSQL 14 and later report at every login (`in_hot_standby`,
  `default_transaction_read_only`): a server of the wrong kind is closed and the next host tried,
  so an entry follows its primary after a failover without a configuration change.
- One `HostList` per [databases] entry, shared by all its pools (PoolManager), so the rotation
  and the down marks are the entry's.
- A host beginning with "/" is a directory holding PostgreSQL's unix socket (`.s.PGSQL.<port>`),
  one beginning with "@" the same in the abstract namespace, as in libpq and PgBouncer;
  `open_stream` reaches either kind (a server's protocol connection opens the same way in
  server.py, through `socket_path`). TLS is never asked for over a unix socket (libpq's rule).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

Target = tuple[str, int]


def socket_path(host: str, port: int) -> str | None:
    """The unix-socket path for `host` (see the module rules), or None for a TCP host."""
    if host.startswith("/"):
        return f"{host.rstrip('/')}/.s.PGSQL.{port}"
    if host.startswith("@"):
        return f"\0{host[1:]}/.s.PGSQL.{port}"
    return None


async def open_stream(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain stream to a server's postmaster (a CancelRequest's connection), TCP or unix."""
    path = socket_path(host, port)
    if path is not None:
        return await asyncio.open_unix_connection(path)
    return await asyncio.open_connection(host, port)


class HostList:
    __slots__ = ("_down_until", "_next", "down_s", "round_robin", "target_session_attrs", "targets")

    def __init__(
        self,
        targets: tuple[Target, ...],
        *,
        round_robin: bool,
        down_s: float,
        target_session_attrs: str = "any",
    ) -> None:
        self.targets = targets
        self.round_robin = round_robin
        self.down_s = down_s
        self.target_session_attrs = target_session_attrs
        self._next = 0
        self._down_until: dict[Target, float] = {}

    def order(self, now: float) -> list[Target]:
        """The hosts to try for one new connection, in order (see the module rules)."""
        targets = list(self.targets)
        if self.round_robin and len(targets) > 1:
            start = self._next % len(targets)
            self._next = start + 1
            targets = targets[start:] + targets[:start]
        up = [t for t in targets if self._down_until.get(t, 0.0) <= now]
        return up + [t for t in targets if t not in up]

    def failed(self, target: Target, now: float) -> None:
        self._down_until[target] = now + self.down_s

    def succeeded(self, target: Target) -> None:
        self._down_until.pop(target, None)

    def accepts(self, parameters: Mapping[str, str]) -> bool:
        """Whether a server that reported `parameters` at login has the kind asked for."""
        wanted = self.target_session_attrs
        if wanted == "any":
            return True
        read_only = parameters.get("in_hot_standby") == "on" or (
            parameters.get("default_transaction_read_only") == "on"
        )
        return read_only if wanted == "read-only" else not read_only
