"""Transaction-mode prepared statements: which statement a name means, and which server has it.

In transaction mode a client's consecutive transactions run on different servers, but a named
prepared statement lives only on the server that parsed it. So pypooler keeps three maps:

- `StatementRegistry` (one per pool): one `Statement` per distinct Parse body after the name
  (query text and parameter types), under a server-side name (`PYPOOLER_<n>`) shared by every
  client that prepares that text: a thousand clients preparing one query cost each server one
  Parse.
- `ClientStatements` (one per client): the client's own statement names -> Statement.
- `ServerStatements` (one per server): what that server has prepared, least recently used first,
  bounded by `max_prepared_statements`.

Rules this module keeps (the streams in `rewriting.py` rely on them):
- An entry pypooler adds for a Parse it sent is *tentative* until the server's ParseComplete
  confirms it, and is undone otherwise: a Parse that fails, or that the server skips after an
  earlier error in its batch, must not leave the LRU believing the server has the statement. A
  tentative entry counts only inside the batch (up to Sync) that sent the Parse.
- The LRU may wrongly believe a server *lacks* a statement (an eviction Close the server skipped
  after an error, a DISCARD ALL that failed). That costs nothing but a Parse, because every Parse
  pypooler injects is preceded by a Close of the same name, and closing a statement that does not
  exist is not an error in PostgreSQL.
- A statement used since the server was lent is never evicted: closing a statement also closes
  the portals built from it. The bound is exceeded instead, until a later lend.
- Statements are reference-counted (client names plus server entries) and dropped at zero, so
  the registry holds only what some client or server still has.
- A shared statement is only as fresh as its first Parse on each server: after a schema change
  (DROP/CREATE/ALTER) a server's copy keeps the old parameter types and PostgreSQL refuses it if
  the result type changed. So each pool's registry follows its database's `SchemaVersion`: when
  the version moves on, the statements it knows are *retired* (kept for the clients and servers
  that hold them, which see what a PostgreSQL client with an old prepared statement sees) and
  the next Parse of a text makes a new statement under a new name, parsed afresh on every
  server. The version moves on when pypooler forwards a schema change (`session_state.scan_sql`
  reports SCHEMA_CHANGE) and when a server reports a stale plan (`is_stale_plan`), which is how
  a migration on a connection that bypasses pypooler is noticed.

Names stay `bytes` end to end: they are copied from one message into another, never shown.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain
from typing import Final

from pypooler.protocol import codec
from pypooler.protocol.listen import parse_listen_statement

SERVER_NAME_PREFIX: Final = b"PYPOOLER_"
# PostgreSQL's answer to a prepared statement whose plan would change its result type after a
# schema change: SQLSTATE 0A000 from RevalidateCachedQuery (the routine name, unlike the message,
# is not translated).
STALE_PLAN_CODE: Final = "0A000"
STALE_PLAN_ROUTINE: Final = "RevalidateCachedQuery"
STALE_PLAN_MESSAGE: Final = "cached plan must not change result type"


def is_stale_plan(fields: dict[str, str]) -> bool:
    """Whether an ErrorResponse's fields say a prepared statement predates a schema change."""
    return fields.get("C") == STALE_PLAN_CODE and (
        fields.get("R") == STALE_PLAN_ROUTINE or fields.get("M", "").startswith(STALE_PLAN_MESSAGE)
    )


class SchemaVersion:
    """Schema changes pypooler has noticed on one PostgreSQL database, shared by its pools."""

    __slots__ = ("number",)

    def __init__(self) -> None:
        self.number = 0

    def changed(self) -> None:
        self.number += 1


class Statement:
    """One query text with its parameter types, as every server knows it."""

    __slots__ = ("close", "key", "listen", "name", "parse", "refs")

    def __init__(self, name: bytes, key: bytes) -> None:
        self.name = name  # the server-side name
        self.key = key  # the Parse body after the name
        self.parse = codec.build_parse(name, key)  # built once, injected as is
        self.close = codec.build_close_statement(name)
        self.refs = 0
        # One LISTEN/UNLISTEN statement: its Bind may be answered by pypooler (listening.py).
        self.listen = parse_listen_statement(key[: max(0, key.find(b"\0"))]) is not None

    def __repr__(self) -> str:
        return f"<Statement {self.name.decode()} refs={self.refs} {self.key[:40]!r}>"


class StatementRegistry:
    """Statements by Parse body, for one pool; server-side names are unique within it."""

    __slots__ = ("_by_key", "_next_number", "_retired", "_version", "schema")

    def __init__(self, schema: SchemaVersion | None = None) -> None:
        self._by_key: dict[bytes, Statement] = {}
        self._next_number = 1
        self.schema = SchemaVersion() if schema is None else schema
        self._version = self.schema.number  # the schema version `_by_key` was made under
        self._retired: set[Statement] = set()  # made under an older version, still referenced

    def acquire(self, key: bytes) -> Statement:
        """The statement for `key` (created on first use), with one more reference."""
        if self._version != self.schema.number:
            self._retire()
        statement = self._by_key.get(key)
        if statement is None:
            name = SERVER_NAME_PREFIX + str(self._next_number).encode()
            self._next_number += 1
            statement = Statement(name, key)
            self._by_key[key] = statement
        statement.refs += 1
        return statement

    def release(self, statement: Statement) -> None:
        statement.refs -= 1
        if statement.refs <= 0:
            if self._by_key.get(statement.key) is statement:
                del self._by_key[statement.key]
            else:
                self._retired.discard(statement)

    def _retire(self) -> None:
        """The schema changed: later Parses get new statements (see the module rules)."""
        self._retired.update(self._by_key.values())
        self._by_key.clear()
        self._version = self.schema.number

    def __len__(self) -> int:
        return len(self._by_key) + len(self._retired)

    def __iter__(self) -> Iterator[Statement]:
        return chain(self._by_key.values(), self._retired)


class ClientStatements:
    """One client's named statements. Every entry holds one reference to its Statement."""

    __slots__ = ("names", "registry")

    def __init__(self, registry: StatementRegistry) -> None:
        self.registry = registry
        self.names: dict[bytes, Statement] = {}

    def add(self, name: bytes, key: bytes) -> Statement:
        statement = self.registry.acquire(key)
        self.names[name] = statement
        return statement

    def drop(self, name: bytes, statement: Statement) -> None:
        """Undo `add` (its Parse failed): forget `name` if it still means `statement`."""
        if self.names.get(name) is statement:
            del self.names[name]
            self.registry.release(statement)

    def take(self, name: bytes) -> Statement | None:
        """Remove `name` but keep its reference: settle with `put_back` or `registry.release`."""
        return self.names.pop(name, None)

    def put_back(self, name: bytes, statement: Statement) -> None:
        if name in self.names:  # re-prepared meanwhile: that one wins, ours is released
            self.registry.release(statement)
        else:
            self.names[name] = statement

    def clear(self) -> None:
        for statement in self.names.values():
            self.registry.release(statement)
        self.names.clear()

    def __len__(self) -> int:
        return len(self.names)


class ServerStatements:
    """What one server has prepared, least recently used first (see the module rules)."""

    __slots__ = ("capacity", "entries", "in_use", "registry", "tentative", "unnamed_owner")

    def __init__(self, registry: StatementRegistry, capacity: int) -> None:
        self.registry = registry
        self.capacity = capacity
        self.entries: OrderedDict[bytes, Statement] = OrderedDict()
        self.tentative: dict[bytes, int] = {}  # name -> the batch whose Parse is unconfirmed
        self.in_use: set[bytes] = set()  # names used since the server was lent
        # Whose unnamed statement the server holds: the client stream whose Parse of it came
        # first in its batch (where no earlier error can make the server skip it), or None.
        # Unnamed statements pass untouched and a server outlives its clients, so a Bind or
        # Describe of the unnamed statement by any other client (without a Parse of it earlier
        # in the same batch) is answered with PostgreSQL's 26000 (see rewriting.py).
        self.unnamed_owner: object | None = None

    def begin_lend(self) -> None:
        self.in_use.clear()

    def has(self, statement: Statement, batch: int) -> bool:
        """Whether the server has `statement` for use in `batch`; marks it recently used."""
        name = statement.name
        if name not in self.entries or self.tentative.get(name, batch) != batch:
            return False
        self.entries.move_to_end(name)
        self.in_use.add(name)
        return True

    def add(self, statement: Statement, batch: int) -> list[Statement]:
        """Record a Parse sent in `batch` (tentative); return the statements to close for room."""
        name = statement.name
        if name in self.entries:  # tentative from an earlier batch: this batch parses again
            self.entries.move_to_end(name)
        else:
            self.entries[name] = statement
            statement.refs += 1
        self.tentative[name] = batch
        self.in_use.add(name)
        evicted: list[Statement] = []
        excess = len(self.entries) - self.capacity
        if excess > 0:
            for old_name, old in self.entries.items():  # oldest first
                if old_name not in self.in_use:
                    evicted.append(old)
                    if len(evicted) == excess:
                        break
            for old in evicted:
                del self.entries[old.name]
                self.registry.release(old)
        return evicted

    def confirm(self, statement: Statement, batch: int) -> None:
        """The server answered ParseComplete for the Parse sent in `batch`."""
        if self.tentative.get(statement.name) == batch:
            del self.tentative[statement.name]

    def undo(self, statement: Statement, batch: int) -> None:
        """The batch ended without ParseComplete: the server does not have it."""
        name = statement.name
        if self.tentative.get(name) == batch:
            del self.tentative[name]
            del self.entries[name]
            self.registry.release(statement)

    def clear(self) -> None:
        """The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL, closed)."""
        for statement in self.entries.values():
            self.registry.release(statement)
        self.entries.clear()
        self.tentative.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries
