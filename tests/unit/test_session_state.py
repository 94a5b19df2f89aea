"""Tests for pypooler.session_state: which statements leave session state behind."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypooler.session_state import (
    MORE_STATEMENTS,
    SUSPECT_FUNCTION,
    SUSPECT_HEAD_KEYS,
    WINDOW,
    head_key,
    plainly_harmless,
    scan_sql,
    suspect_text,
)

TRACKED = frozenset({b"timezone", b"application_name", b"datestyle", b"client_encoding"})


@pytest.mark.parametrize(
    ("sql", "kinds"),
    [
        # Ordinary statements.
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", ()),
        ("INSERT INTO settings VALUES (1)", ()),
        ("select 'set x = 1'", ()),
        ("UPDATE t SET a = 1", ()),
        # SET: session-level unless LOCAL, transaction-scoped, or a reported setting.
        ("SET statement_timeout = 5000", ("set",)),
        ("set session search_path to public", ("set",)),
        ("SET SESSION AUTHORIZATION alice", ("set",)),
        ("SET ROLE alice", ("set",)),
        ("SET LOCAL statement_timeout = 5000", ()),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", ()),
        ("SET CONSTRAINTS ALL DEFERRED", ()),
        ("SET TIME ZONE 'UTC'", ()),
        ('SET "DateStyle" TO ISO', ()),
        ("SET application_name = 'x'", ()),
        ("SET NAMES 'UTF8'", ()),
        ("  -- comment\n  /* another */ SET work_mem = '1MB'", ("set",)),
        ("BEGIN; SET search_path = x; COMMIT", ("set",)),
        # set_config(..., is_local).
        ("SELECT set_config('search_path', 'x', false)", ("set_config",)),
        ("SELECT set_config('search_path', 'x', true)", ()),
        ("SELECT set_config('application_name', 'x', false)", ()),
        ("SELECT set_config('a.b', format('%s,%s', 1, 2), false)", ("set_config",)),
        ("SELECT set_config($1, $2, $3)", ("set_config",)),
        # Advisory locks: the session ones only.
        ("SELECT pg_advisory_lock(42)", ("advisory_lock",)),
        ("select pg_try_advisory_lock_shared(1, 2)", ("advisory_lock",)),
        ("SELECT pg_advisory_xact_lock(42)", ()),
        ("SELECT pg_advisory_unlock_all()", ()),
        # Temporary tables.
        ("CREATE TEMP TABLE t (i int)", ("temp_table",)),
        ("create global temporary table t (i int)", ("temp_table",)),
        ("CREATE TEMP TABLE t (i int) ON COMMIT DROP", ()),
        # Schema changes (shared prepared statements are parsed afresh after one).
        ("CREATE TABLE temp (i int)", ("schema_change",)),
        ("create or replace view v as select 1", ("schema_change",)),
        ("ALTER TABLE t ADD COLUMN b int", ("schema_change",)),
        ("drop type mood cascade", ("schema_change",)),
        ("DO $$ BEGIN EXECUTE 'ALTER TABLE t ADD b int'; END $$", ("schema_change",)),
        ("do\n$$ begin end $$", ("schema_change",)),
        ("BEGIN; ALTER TABLE t ADD b int; COMMIT", ("schema_change",)),
        ("DOUBLE", ()),
        # LISTEN, cursors, SQL PREPARE.
        ("LISTEN channel", ("listen",)),
        ("UNLISTEN *", ("unlisten",)),  # no leak: spotted for listen_mode = "multiplex"
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", ("with_hold",)),
        ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", ()),
        ("PREPARE p AS SELECT 1", ("prepare",)),
        ("PREPARE TRANSACTION 'gid'", ()),
        # Not leaks, but pypooler must know.
        ("DISCARD ALL", ("discard_all",)),
        ("DISCARD PLANS", ()),
        ("DEALLOCATE ALL", ("deallocate_all",)),
        ("deallocate prepare all;", ("deallocate_all",)),
        ("DEALLOCATE p", ()),
        ("RESET ALL", ("reset",)),
        ("RESET statement_timeout", ("reset",)),
        ("SET statement_timeout TO DEFAULT", ("reset",)),
        ("set session timezone = default", ("reset",)),
        ("SET TIME ZONE LOCAL", ("reset",)),
        ("SET TIME ZONE DEFAULT", ("reset",)),
        ("SET statement_timeout TO 'default'", ("set",)),  # a string, not the keyword
        ("SET LOCAL statement_timeout TO DEFAULT", ()),
        # Several at once.
        ("SET a.b = 1; SELECT pg_advisory_lock(1); LISTEN x", ("advisory_lock", "set", "listen")),
    ],
)
def test_kinds(sql: str, kinds: tuple[str, ...]) -> None:
    assert scan_sql(sql.encode(), TRACKED) == kinds


def test_only_the_window_is_scanned() -> None:
    padding = "SELECT " + "1, " * (WINDOW // 3)
    assert scan_sql(f"{padding}1; LISTEN x".encode(), TRACKED) == ()
    assert scan_sql(b"LISTEN x; " + padding.encode(), TRACKED) == ("listen",)


def test_truncated_text_does_not_raise() -> None:
    for sql in (b"SET", b"set ", b"SET SESSION", b"create", b"select set_config(", b"/* open", b"--"):
        scan_sql(sql, TRACKED)


# --- the hot path's quick negative ------------------------------------------------------------

_WORDS = ["SELECT", "select", "set", "SET", "Reset", "prepare", "LISTEN", "declare", "create",
          "temp", "with", "hold", "discard", "all", "pg_advisory_lock(1)", "PG_ADVISORY_LOCK(2)",
          "Pg_Try_Advisory_Lock(3)", "set_config('a', 'b', false)", "SET_CONFIG('x','y',true)",
          "pg_advisory_xact_lock(1)", "row_lock", ";", "; ", "'a;b'", "--c\n", "/* c */", " ",
          "\n", "1", "x", "deallocate", "local", "timezone", "=", "ALTER", "drop", "Do", "do$$",
          "double", "table", "UNLISTEN", "unlisten"]  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=8))
def test_plainly_harmless_text_is_nothing_to_the_full_scan(words: list[str]) -> None:
    text = " ".join(words).encode()
    message = b"Q\0\0\0\0" + text + b"\0"

    if plainly_harmless(message, 5, len(message) - 1):
        assert scan_sql(text, TRACKED) == ()


@pytest.mark.parametrize(
    "sql",
    ["SELECT 1", "select abalance from pgbench_accounts where aid = 7;", "INSERT INTO t VALUES (1)",
     "UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = 3;", "BEGIN;", "END;"],
)  # fmt: skip
def test_ordinary_statements_take_the_quick_path(sql: str) -> None:
    message = b"Q\0\0\0\0" + sql.encode() + b"\0"

    assert plainly_harmless(message, 5, len(message) - 1)


@pytest.mark.parametrize(
    "sql",
    ["SET x = 1", " SELECT 1", "/* c */ SELECT 1", "SELECT Pg_Advisory_Lock(1)",
     "select set_config('a', 'b', false)", "SELECT 1; SET x = 1", "listen x", "DISCARD ALL",
     "ALTER TABLE t ADD b int", "drop table t", "DO $$ begin end $$", "Do\n$$x$$", "do$$x$$",
     "UNLISTEN *", "unlisten x"],
)  # fmt: skip
def test_suspect_statements_get_the_full_scan(sql: str) -> None:
    message = b"Q\0\0\0\0" + sql.encode() + b"\0"

    assert not plainly_harmless(message, 5, len(message) - 1)


# The quick checks come twice, as byte arithmetic (compiled) and as regular expressions (sources).
_PIECES = [b"_", b"lock", b"LoCk", b"config", b"CONFIG", b"conf", b"loc", b";", b" ", b"\t", b"\n", b"x",
           b"'", b"1", b"\x0b", b"\x0c", b"\r", b"_l", b"_c", b"\xc3\xa9"]  # fmt: skip


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12), st.integers(0, 3), st.integers(0, 3))
def test_quick_checks_match_their_regular_expressions(pieces: list[bytes], cut: int, cut_end: int) -> None:
    data = b"".join(pieces)
    start = min(cut, len(data))
    end = max(start, len(data) - cut_end)

    suspect = SUSPECT_FUNCTION.search(data, start, end) is not None
    more = MORE_STATEMENTS.search(data, start, end) is not None
    assert suspect_text(data, start, end) == (suspect or more)


@pytest.mark.parametrize(
    "head",
    [b"set", b"SET", b"Res", b"pRe", b"lis", b"dec", b"cre", b"dis", b"DEA", b"alt", b"DRO", b"do ", b"DO\n"],
)
def test_head_key_knows_the_suspect_heads_in_any_case(head: bytes) -> None:
    assert head_key(head + b" x", 0) in SUSPECT_HEAD_KEYS


@pytest.mark.parametrize("head", [b"sel", b"SEL", b"upd", b"ins", b"beg", b"end", b"S\xc5t", b"s@t", b"se{"])
def test_head_key_lets_other_heads_pass(head: bytes) -> None:
    assert head_key(head + b" x", 0) not in SUSPECT_HEAD_KEYS
