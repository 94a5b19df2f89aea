"""Tests for pypooler.prepared: shared statements, client names, the per-server LRU."""

from __future__ import annotations

from pypooler.prepared import ClientStatements, ServerStatements, StatementRegistry
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
