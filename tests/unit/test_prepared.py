"""Tests for pypooler.prepared: shared statements, client names, the per-server LRU."""

from __future__ import annotations

from pypooler.prepared import (
    ClientStatements,
    SchemaVersion,
    ServerStatements,
    StatementRegistry,
    is_stale_plan,
)
from pypooler.protocol import codec


def test_one_statement_per_text_with_a_server_side_name() -> None:
    registry = StatementRegistry()
    a = ClientStatements(registry)
    b = ClientStatements(registry)
    first = a.add(b"s1", b"SELECT 1\0\0\0")
    assert b.add(b"other", b"SELECT 1\0\0\0") is first
    assert b.add(b"s1", b"SELECT 2\0\0\0") is not first
    assert first.name == b"PYPOOLER_1"
    assert first.parse == codec.build_parse(b"PYPOOLER_1", b"SELECT 1\0\0\0")
    assert len(registry) == 2
    a.clear()
    b.clear()
    assert len(registry) == 0


def test_tentative_entries_count_only_in_their_batch_and_undo() -> None:
    registry = StatementRegistry()
    client = ClientStatements(registry)
    server = ServerStatements(registry, capacity=10)
    statement = client.add(b"s", b"SELECT 1\0\0\0")
    assert not server.has(statement, 1)
    server.add(statement, 1)
    assert server.has(statement, 1)
    assert not server.has(statement, 2)  # the Parse of batch 1 may still fail
    server.undo(statement, 1)
    assert statement.name not in server
    server.add(statement, 2)
    server.confirm(statement, 2)
    assert server.has(statement, 3)
    server.undo(statement, 2)  # too late: confirmed
    assert statement.name in server


def test_least_recently_used_is_evicted_but_not_what_this_lend_used() -> None:
    registry = StatementRegistry()
    client = ClientStatements(registry)
    server = ServerStatements(registry, capacity=2)
    one, two, three, four = (client.add(f"s{i}".encode(), f"SELECT {i}\0\0\0".encode()) for i in range(4))
    for number, statement in enumerate((one, two), start=1):
        server.add(statement, number)
        server.confirm(statement, number)
    server.begin_lend()
    assert server.has(one, 5)  # one is now the most recently used
    assert server.add(three, 5) == [two]
    assert server.add(four, 5) == []  # one and three were used in this lend: over the bound
    assert len(server) == 3
    server.begin_lend()
    server.has(four, 6)
    assert server.add(two, 6) == [one, three]
    client.clear()
    server.clear()
    assert len(registry) == 0


def test_a_client_close_can_be_put_back() -> None:
    registry = StatementRegistry()
    client = ClientStatements(registry)
    statement = client.add(b"s", b"SELECT 1\0\0\0")
    taken = client.take(b"s")
    assert taken is statement and len(registry) == 1  # the reference is still held
    client.put_back(b"s", statement)
    assert client.names == {b"s": statement}
    client.drop(b"s", statement)
    assert len(registry) == 0


def test_a_schema_change_retires_statements_for_later_parses_only() -> None:
    registry = StatementRegistry(SchemaVersion())
    old_client = ClientStatements(registry)
    server = ServerStatements(registry, capacity=10)
    old = old_client.add(b"s", b"SELECT col FROM t\0\0\0")
    server.add(old, 1)
    server.confirm(old, 1)

    registry.schema.changed()
    new_client = ClientStatements(registry)
    new = new_client.add(b"s", b"SELECT col FROM t\0\0\0")

    assert new is not old and new.name != old.name  # parsed afresh under its own name
    assert old_client.names[b"s"] is old  # prepared before the change: keeps the old one
    assert not server.has(new, 2) and server.has(old, 2)
    assert set(registry) == {old, new} and len(registry) == 2
    assert new_client.add(b"t", b"SELECT col FROM t\0\0\0") is new  # shared again until the next change
    old_client.clear()
    server.clear()
    assert set(registry) == {new}  # the retired statement went with its last reference


def test_the_pools_of_one_database_share_its_schema_version() -> None:
    schema = SchemaVersion()
    first, second = StatementRegistry(schema), StatementRegistry(schema)
    before = ClientStatements(second).add(b"s", b"SELECT 1\0\0\0")
    first.schema.changed()
    assert ClientStatements(second).add(b"s", b"SELECT 1\0\0\0") is not before


def test_stale_plan_errors_are_known_by_code_and_routine_or_message() -> None:
    assert is_stale_plan({"C": "0A000", "M": "cached plan must not change result type"})
    assert is_stale_plan({"C": "0A000", "M": "le plan en cache ...", "R": "RevalidateCachedQuery"})
    assert not is_stale_plan({"C": "0A000", "M": "cannot do this", "R": "something_else"})
    assert not is_stale_plan({"C": "42P01", "M": "relation does not exist"})
