"""Real clients through pypooler in transaction mode: psql, pgbench, psycopg 3 and asyncpg.

Rules these tests keep:
- Every pooler here pools in transaction mode with a small pool (POOL_SIZE, or 1 where a test
  needs to know which server a client gets), so clients really share servers.
- A scenario that is cheap to run twice runs first against PostgreSQL directly and then through
  the pooler, and the two outcomes must be equal: a failure that shows only through the pooler is
  the pooler's, not the client library's or the test's.
- Session state does not survive a transaction in transaction mode, so scenarios keep their state
  in regular tables (made and dropped by the `make_table` fixture) or inside one transaction.
- These scenarios exercise unnamed statements: psycopg runs with prepare_threshold=None, asyncpg
  with statement_cache_size=0. Named prepared statements (the drivers' defaults, pgbench -M
  prepared) have their own tests in test_prepared_statements.py.
- Every subprocess and every connection has a timeout, so a stuck pooler fails a test instead
  of hanging the suite.
"""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from pypooler.embedded import EmbeddedPostgres

# Small enough that pgbench's 8 clients must share servers, big enough for real concurrency.
POOL_SIZE = 3
# psql finishes in well under a second; the margin is for a loaded CI machine.
PSQL_TIMEOUT_S = 30
# pgbench runs for -T seconds plus connection set-up and the final report.
PGBENCH_TIMEOUT_S = 60
# Client-side limits so a pooler that stops answering fails the test rather than hanging it.
CONNECT_TIMEOUT_S = 10
COMMAND_TIMEOUT_S = 30
# Rows in the "large result" tests: many protocol messages, several read buffers' worth.
LARGE_RESULT_ROWS = 200_000
# A single value bigger than any socket buffer, so one DataRow spans many reads.
LARGE_VALUE_BYTES = 5 * 1024 * 1024
NO_PASSFILE = "/nonexistent/pypooler-tests/pgpass"
PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_history", "pgbench_tellers")

# tests/conftest.py's RunningPooler and start_pooler; conftest is not an importable module.
RunningPoolerLike = Any
Runner = Callable[..., RunningPoolerLike]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def pooler(start_pooler: Runner) -> RunningPoolerLike:
    """pypooler in transaction mode with POOL_SIZE servers per (database, user)."""
    return start_pooler(pool_size=POOL_SIZE, pool_mode="transaction")


@pytest.fixture
def make_table(postgres: EmbeddedPostgres) -> Iterator[Callable[[], str]]:
    """Factory for fresh regular tables `(id int primary key, note text)`, dropped afterwards.

    Regular tables, not temporary ones: in transaction mode consecutive transactions of one
    client may run on different servers, and a temp table lives on only one of them.
    """
    names: list[str] = []

    def make() -> str:
        name = f"clients_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
        names.append(name)
        return name

    yield make
    if names:
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS " + ", ".join(names))


@pytest.fixture(scope="module")
def pgbench_tables(postgres: EmbeddedPostgres) -> Iterator[None]:
    """`pgbench -i -s 1` straight into PostgreSQL once for this module; tables dropped after."""
    result = subprocess.run(
        [postgres.bin("pgbench"), "-i", "-s", "1", "-q",
         "-h", postgres.host, "-p", str(postgres.port), "-U", "postgres", "pypooler_test"],
        env=_client_env(postgres), capture_output=True, text=True, timeout=PGBENCH_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    yield
    postgres.psql("DROP TABLE IF EXISTS " + ", ".join(PGBENCH_TABLES))


# -- helpers -------------------------------------------------------------------------------------


def _client_env(postgres: EmbeddedPostgres) -> dict[str, str]:
    env = postgres.env()
    # libpq warns on stderr that /dev/null "is not a plain file"; a missing file is silent.
    env["PGPASSFILE"] = NO_PASSFILE
    return env


def _psql(
    postgres: EmbeddedPostgres, port: int, *args: str, dbname: str = "pypooler_test"
) -> subprocess.CompletedProcess[str]:
    """Run psql -X (no psqlrc) as user postgres over TCP to 127.0.0.1:`port`."""
    return subprocess.run(
        [postgres.bin("psql"), "-X", "-w",
         "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", dbname, *args],
        env=_client_env(postgres), capture_output=True, text=True, timeout=PSQL_TIMEOUT_S,
    )  # fmt: skip


def _psql_both(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, *args: str, dbname: str = "pypooler_test"
) -> subprocess.CompletedProcess[str]:
    """Run the same psql command direct and through the pooler; they must agree exactly."""
    direct = _psql(postgres, postgres.port, *args, dbname=dbname)
    pooled = _psql(postgres, pooler.port, *args, dbname=dbname)
    assert (pooled.returncode, pooled.stdout, pooled.stderr) == (
        direct.returncode,
        direct.stdout,
        direct.stderr,
    ), f"direct: {direct!r}\npooled: {pooled!r}"
    return pooled


def _psycopg_connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, prepare_threshold=None, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)


def transaction_status(conn: psycopg.Connection[Any]) -> TransactionStatus:
    """The status now: mypy would carry an earlier assert's narrowing across a commit."""
    return conn.info.transaction_status


async def _psycopg_aconnect(dsn: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        dsn, prepare_threshold=None, connect_timeout=CONNECT_TIMEOUT_S, **kwargs
    )


async def _asyncpg_connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        dsn, statement_cache_size=0, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S
    )


def _on_both(
    postgres: EmbeddedPostgres,
    pooler: RunningPoolerLike,
    make_table: Callable[[], str],
    scenario: Callable[[str, str], Any],
) -> Any:
    """Run `scenario(dsn, table)` direct, then through the pooler; return the (equal) outcome."""
    direct = scenario(postgres.dsn(), make_table())
    pooled = scenario(pooler.dsn(), make_table())
    assert pooled == direct
    return pooled


async def _on_both_async(
    postgres: EmbeddedPostgres,
    pooler: RunningPoolerLike,
    make_table: Callable[[], str],
    scenario: Callable[[str, str], Awaitable[Any]],
) -> Any:
    direct = await scenario(postgres.dsn(), make_table())
    pooled = await scenario(pooler.dsn(), make_table())
    assert pooled == direct
    return pooled


# -- psql ----------------------------------------------------------------------------------------


def test_psql_commands_and_unaligned_output(postgres: EmbeddedPostgres, pooler: RunningPoolerLike) -> None:
    result = _psql_both(
        postgres, pooler, "-A", "-t", "-F", ",", "-P", "null=<null>",
        "-c", "SELECT 1 AS a, 'x' AS b, NULL::int AS c",
        "-c", "SELECT g FROM generate_series(1, 3) AS g; SELECT 'second statement'",
        "-c", "SELECT current_database(), current_user",
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "1,x,<null>",
        "1",
        "2",
        "3",
        "second statement",
        "pypooler_test,postgres",
    ]
    other_db = _psql_both(postgres, pooler, "-A", "-t", "-c", "SELECT current_database()", dbname="postgres")
    assert other_db.stdout == "postgres\n"


def test_psql_script_file_with_transactions(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str], tmp_path: Path
) -> None:
    def run(port: int) -> subprocess.CompletedProcess[str]:
        table = make_table()
        script = tmp_path / f"script_{port}.sql"
        script.write_text(
            f"""
            BEGIN;
            SELECT pg_backend_pid() AS tx_pid \\gset
            INSERT INTO {table} VALUES (1, 'one'), (2, 'two');
            SET LOCAL application_name = 'inside_tx';
            UPDATE {table} SET note = 'uno' WHERE id = 1;
            SELECT count(*), current_setting('application_name') FROM {table};
            SELECT pg_backend_pid() = :tx_pid AS same_server;
            COMMIT;
            BEGIN;
            INSERT INTO {table} VALUES (3, 'three');
            ROLLBACK;
            SELECT id, note FROM {table} ORDER BY id;
            SELECT 'multi', 1; SELECT 'line', 2;
            """
        )
        return _psql(postgres, port, "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script))

    direct = run(postgres.port)
    pooled = run(pooler.port)
    assert (pooled.returncode, pooled.stderr) == (0, ""), pooled.stderr
    assert pooled.stdout.splitlines() == ["2|inside_tx", "t", "1|uno", "2|two", "multi|1", "line|2"]
    assert pooled.stdout == direct.stdout


def test_psql_copy_in_and_out(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str], tmp_path: Path
) -> None:
    rows = [f"{i},note {i}" for i in range(1, 1001)]
    source = tmp_path / "in.csv"
    source.write_text("\n".join(rows) + "\n")

    def run(port: int) -> tuple[subprocess.CompletedProcess[str], str]:
        table = make_table()
        target = tmp_path / f"out_{port}.csv"
        script = tmp_path / f"copy_{port}.sql"
        script.write_text(
            f"\\copy {table} FROM '{source}' WITH (FORMAT csv)\n"
            f"COPY {table} FROM STDIN;\n"
            "5001\tfrom stdin\n"
            "5002\t\\N\n"
            "\\.\n"
            f"\\copy (SELECT id, note FROM {table} ORDER BY id) TO '{target}' WITH (FORMAT csv)\n"
            f"SELECT count(*), count(note) FROM {table};\n"
        )
        result = _psql(postgres, port, "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script))
        return result, target.read_text() if target.exists() else ""

    direct, direct_out = run(postgres.port)
    pooled, pooled_out = run(pooler.port)
    assert (pooled.returncode, pooled.stderr) == (0, ""), pooled.stderr
    assert pooled.stdout == "1002|1001\n"
    assert pooled_out.splitlines() == [*rows, "5001,from stdin", "5002,"]
    assert (pooled.stdout, pooled_out) == (direct.stdout, direct_out)


def test_psql_on_error_stop(postgres: EmbeddedPostgres, start_pooler: Runner, tmp_path: Path) -> None:
    # One server: the client that quits inside a failed transaction must not hand it on dirty.
    pooler = start_pooler(pool_size=1, pool_mode="transaction")
    script = tmp_path / "fails.sql"
    script.write_text("SELECT 'before';\nBEGIN;\nSELECT 1/0;\nSELECT 'after';\nCOMMIT;\n")

    in_script = _psql_both(postgres, pooler, "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script))
    assert in_script.returncode == 3  # "an error occurred in a script and ON_ERROR_STOP was set"
    assert in_script.stdout == "before\n"
    assert in_script.stderr == f"psql:{script}:3: ERROR:  division by zero\n"

    in_command = _psql_both(postgres, pooler, "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", "SELECT 1/0")
    assert in_command.returncode == 1
    assert "ERROR:  division by zero" in in_command.stderr

    # now() is the transaction's start: equal to the statement's only if no transaction was left open.
    after = _psql(
        postgres, pooler.port, "-A", "-t", "-c", "SELECT 'next client', now() = statement_timestamp()"
    )
    assert (after.returncode, after.stdout, after.stderr) == (0, "next client|t\n", "")


# -- pgbench -------------------------------------------------------------------------------------


PGBENCH_RUNS = {
    "select-only": ["-n", "-S", "-T", "3", "-c", "8", "-j", "2"],
    "tpcb-like": ["-n", "-T", "3", "-c", "8", "-j", "2"],
    "connect-per-transaction": ["-n", "-S", "-C", "-T", "3", "-c", "4"],
    "extended-protocol": ["-n", "-S", "-M", "extended", "-T", "2", "-c", "4", "-j", "2"],
}


@pytest.mark.usefixtures("pgbench_tables")
@pytest.mark.parametrize("args", PGBENCH_RUNS.values(), ids=PGBENCH_RUNS.keys())
def test_pgbench(postgres: EmbeddedPostgres, pooler: RunningPoolerLike, args: list[str]) -> None:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        started_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    result = subprocess.run(
        [postgres.bin("pgbench"), "-h", pooler.host, "-p", str(pooler.port), "-U", "postgres",
         *args, "pypooler_test"],
        env=_client_env(postgres), capture_output=True, text=True, timeout=PGBENCH_TIMEOUT_S,
    )  # fmt: skip
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "ERROR" not in result.stderr, report
    assert re.search(r"^number of failed transactions: 0 ", result.stdout, re.M), report
    processed = re.search(r"^number of transactions actually processed: (\d+)", result.stdout, re.M)
    assert processed is not None and int(processed.group(1)) > 0, report

    # The pooler's servers carry no application_name; those opened during this run must fit the pool.
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        servers = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND datname = 'pypooler_test' AND application_name = '' AND backend_start >= %s"
            " AND pid <> pg_backend_pid()",
            (started_at,),
        ).fetchone()[0]  # type: ignore[index]
    assert servers <= POOL_SIZE


# -- psycopg 3, blocking -------------------------------------------------------------------------


def test_psycopg_simple_and_extended_queries(postgres: EmbeddedPostgres, pooler: RunningPoolerLike) -> None:
    def scenario(dsn: str) -> list[Any]:
        seen: list[Any] = []
        with _psycopg_connect(dsn) as conn:
            # ClientCursor binds client-side and sends one simple Query, several statements at once.
            with psycopg.ClientCursor(conn) as client_side:
                client_side.execute("SELECT 1, 'a'; SELECT %s::text", ("client-side",))
                seen.append(client_side.fetchall())
                assert client_side.nextset()
                seen.append(client_side.fetchall())
            # The default cursor uses Parse/Bind/Execute with the parameters out of band.
            cur = conn.execute("SELECT %s::int + %s, %s::text, %s::int IS NULL", (40, 2, "x", None))
            seen.append(cur.fetchall())
            cur = conn.execute("SELECT %b::int8, %b::bytea", (2**40, b"\x00\xff"), binary=True)
            seen.append(cur.fetchall())
            conn.rollback()
        return seen

    assert (
        scenario(pooler.dsn())
        == scenario(postgres.dsn())
        == [
            [(1, "a")],
            [("client-side",)],
            [(42, "x", True)],
            [(2**40, b"\x00\xff")],
        ]
    )


def test_psycopg_transactions(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        with _psycopg_connect(dsn) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'committed')")
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert conn.info.transaction_status == TransactionStatus.INTRANS
            # Within one transaction the client keeps its server.
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
            conn.commit()
            conn.execute(f"INSERT INTO {table} VALUES (2, 'rolled back')")
            conn.rollback()
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (3, 'outer')")
                with pytest.raises(pg_errors.UniqueViolation), conn.transaction():
                    conn.execute(f"INSERT INTO {table} VALUES (4, 'savepoint')")
                    conn.execute(f"INSERT INTO {table} VALUES (3, 'duplicate')")
                conn.execute(f"INSERT INTO {table} VALUES (5, 'after savepoint')")
            assert transaction_status(conn) == TransactionStatus.IDLE
            rows = conn.execute(f"SELECT id, note FROM {table} ORDER BY id").fetchall()
            conn.rollback()
            return rows

    rows = _on_both(postgres, pooler, make_table, scenario)
    assert rows == [(1, "committed"), (3, "outer"), (5, "after savepoint")]


def test_psycopg_error_leaves_transaction_failed(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike
) -> None:
    def scenario(dsn: str) -> list[Any]:
        seen: list[Any] = []
        with _psycopg_connect(dsn) as conn:
            conn.execute("SELECT 1")
            with pytest.raises(pg_errors.DivisionByZero):
                conn.execute("SELECT 1/0")
            seen.append(conn.info.transaction_status)
            with pytest.raises(pg_errors.InFailedSqlTransaction):
                conn.execute("SELECT 2")
            conn.rollback()
            seen.append(conn.info.transaction_status)
            seen.append(conn.execute("SELECT 3").fetchone())
            conn.rollback()

            # The same with explicit BEGIN/ROLLBACK statements in autocommit mode.
            conn.autocommit = True
            conn.execute("BEGIN")
            with pytest.raises(pg_errors.UndefinedTable):
                conn.execute("SELECT * FROM no_such_table_here")
            seen.append(conn.info.transaction_status)
            conn.execute("ROLLBACK")
            seen.append(conn.info.transaction_status)
            seen.append(conn.execute("SELECT 4").fetchone())
        return seen

    assert (
        scenario(pooler.dsn())
        == scenario(postgres.dsn())
        == [
            TransactionStatus.INERROR,
            TransactionStatus.IDLE,
            (3,),
            TransactionStatus.INERROR,
            TransactionStatus.IDLE,
            (4,),
        ]
    )


def test_psycopg_autocommit(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        with _psycopg_connect(dsn, autocommit=True) as conn:
            first = conn.execute("SELECT txid_current()").fetchone()
            second = conn.execute("SELECT txid_current()").fetchone()
            conn.execute(f"INSERT INTO {table} VALUES (1, 'autocommitted')")
            status = conn.info.transaction_status
        with _psycopg_connect(dsn, autocommit=True) as other:
            rows = other.execute(f"SELECT id, note FROM {table}").fetchall()
        return [first != second, status, rows]

    assert _on_both(postgres, pooler, make_table, scenario) == [
        True,
        TransactionStatus.IDLE,
        [(1, "autocommitted")],
    ]


def test_psycopg_executemany(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        with _psycopg_connect(dsn) as conn, conn.cursor() as cur:
            # With libpq >= 14 psycopg sends these as one pipeline: many Syncs in flight.
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"row {i}") for i in range(500)])
            cur.executemany(
                f"UPDATE {table} SET note = %s WHERE id = %s RETURNING id",
                [("even", i) for i in range(0, 10, 2)],
                returning=True,
            )
            returned = []
            while True:
                returned.extend(cur.fetchall())
                if not cur.nextset():
                    break
            conn.commit()
            counts = conn.execute(
                f"SELECT count(*), count(*) FILTER (WHERE note = 'even') FROM {table}"
            ).fetchone()
            conn.rollback()
        return [returned, counts]

    assert _on_both(postgres, pooler, make_table, scenario) == [[(0,), (2,), (4,), (6,), (8,)], (500, 5)]


def test_psycopg_named_cursor_in_transaction(postgres: EmbeddedPostgres, pooler: RunningPoolerLike) -> None:
    def scenario(dsn: str) -> list[Any]:
        with _psycopg_connect(dsn) as conn:
            # Not autocommit: the DECLARE and every FETCH run inside one transaction (one server).
            with conn.cursor("clients_cursor") as cur:
                cur.itersize = 100
                cur.execute("SELECT g, repeat('x', g % 7) FROM generate_series(1, 1000) AS g")
                first = cur.fetchmany(10)
                cur.scroll(500, mode="absolute")
                rest = list(cur)
            conn.commit()
        return [[r[0] for r in first], len(rest), rest[0][0], sum(r[0] for r in rest)]

    assert (
        scenario(pooler.dsn())
        == scenario(postgres.dsn())
        == [
            list(range(1, 11)),
            500,
            501,
            sum(range(501, 1001)),
        ]
    )


def test_psycopg_copy_text_and_binary(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        with _psycopg_connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, note) FROM STDIN") as copy:
                for i in range(1, 2001):
                    copy.write_row((i, f"text {i}" if i % 1000 else None))
            with cur.copy(f"COPY {table} (id, note) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                for i in range(2001, 4001):
                    copy.write_row((i, f"binary {i}"))
            # An exception inside the block makes psycopg send CopyFail and wait for the server's
            # ErrorResponse and ReadyForQuery before it re-raises.
            with pytest.raises(RuntimeError), cur.copy(f"COPY {table} FROM STDIN") as copy:
                copy.write_row((9999, "never stored"))
                raise RuntimeError("abandon this copy")
            every_500th = f"SELECT id, note FROM {table} WHERE id % 500 = 0 ORDER BY id"
            with cur.copy(f"COPY ({every_500th}) TO STDOUT") as copy:
                text_out = list(copy.rows())
            all_rows = f"SELECT id, note FROM {table} ORDER BY id"
            with cur.copy(f"COPY ({all_rows}) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                binary_out = list(copy.rows())
            with cur.copy(f"COPY (SELECT id FROM {table} WHERE id <= 3 ORDER BY id) TO STDOUT") as copy:
                raw = b"".join(bytes(block) for block in copy)
            status = conn.info.transaction_status
        return [text_out, len(binary_out), binary_out[0], binary_out[-1], raw, status]

    text_out, binary_rows, first, last, raw, status = _on_both(postgres, pooler, make_table, scenario)
    assert text_out[:3] == [("500", "text 500"), ("1000", None), ("1500", "text 1500")]
    assert len(text_out) == 8
    assert (binary_rows, first, last) == (4000, (1, "text 1"), (4000, "binary 4000"))
    assert raw == b"1\n2\n3\n"
    assert status == TransactionStatus.IDLE


def test_psycopg_copy_inside_transaction(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        with _psycopg_connect(dsn) as conn, conn.cursor() as cur:
            with cur.copy(f"COPY {table} FROM STDIN") as copy:
                copy.write(b"1\tkept\n2\tkept\n")
            conn.commit()
            with cur.copy(f"COPY {table} FROM STDIN") as copy:
                copy.write(b"3\tdropped\n")
            conn.rollback()
            rows = conn.execute(f"SELECT id, note FROM {table} ORDER BY id").fetchall()
            conn.rollback()
        return rows

    assert _on_both(postgres, pooler, make_table, scenario) == [(1, "kept"), (2, "kept")]


def test_psycopg_pipeline(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    def scenario(dsn: str, table: str) -> list[Any]:
        seen: list[Any] = []
        with _psycopg_connect(dsn, autocommit=True) as conn:
            with conn.pipeline() as pipeline:
                a = conn.execute("SELECT 1")
                b = conn.execute(f"INSERT INTO {table} VALUES (%s, %s) RETURNING id", (1, "first"))
                pipeline.sync()
                c = conn.execute("SELECT %s::text", ("after sync",))
            seen.append([a.fetchall(), b.fetchall(), c.fetchall()])

            # An error in the middle: the server skips the rest of that Sync's batch and rolls back
            # its implicit transaction (the insert before the error too); psycopg raises.
            with pytest.raises(pg_errors.DivisionByZero), conn.pipeline():
                before = conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (2, "before error"))
                conn.execute("SELECT 1/0")
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (3, "after error"))
            seen.append(before.statusmessage)
            seen.append(conn.info.transaction_status)

            # The connection (and the server it shared) works for the next pipeline.
            with conn.pipeline():
                d = conn.execute("SELECT %s::int * 2", (21,))
                e = conn.execute(f"SELECT id, note FROM {table} ORDER BY id")
            seen.append([d.fetchall(), e.fetchall()])

        # A pipeline inside an explicit transaction: the whole batch rolls back on error.
        with _psycopg_connect(dsn) as conn:
            with pytest.raises(pg_errors.UniqueViolation), conn.pipeline():
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (10, "in tx"))
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "duplicate"))
            seen.append(conn.info.transaction_status)
            conn.rollback()
            seen.append(conn.execute(f"SELECT count(*) FROM {table}").fetchone())
            conn.rollback()
        return seen

    assert _on_both(postgres, pooler, make_table, scenario) == [
        [[(1,)], [(1,)], [("after sync",)]],
        "INSERT 0 1",
        TransactionStatus.IDLE,
        [[(42,)], [(1, "first")]],
        TransactionStatus.INERROR,
        (1,),
    ]


# -- psycopg 3, async ----------------------------------------------------------------------------


async def test_psycopg_async_queries_and_transactions(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        seen: list[Any] = []
        async with await _psycopg_aconnect(dsn) as conn:
            cur = await conn.execute("SELECT %s::int + %s, %s::text", (1, 2, "async"))
            seen.append(await cur.fetchone())
            await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "committed"))
            await conn.commit()
            await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (2, "rolled back"))
            await conn.rollback()
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (3, "outer"))
                with pytest.raises(pg_errors.UniqueViolation):
                    async with conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "duplicate"))
            with pytest.raises(pg_errors.DivisionByZero):
                await conn.execute("SELECT 1/0")
            seen.append(conn.info.transaction_status)
            await conn.rollback()
            async with conn.cursor() as acur:
                await acur.executemany(
                    f"INSERT INTO {table} VALUES (%s, %s)", [(i, "many") for i in range(10, 20)]
                )
            await conn.commit()
            cur = await conn.execute(f"SELECT id, note FROM {table} WHERE id < 10 ORDER BY id")
            seen.append(await cur.fetchall())
            cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE note = 'many'")
            seen.append(await cur.fetchone())
            await conn.rollback()
        return seen

    assert await _on_both_async(postgres, pooler, make_table, scenario) == [
        (3, "async"),
        TransactionStatus.INERROR,
        [(1, "committed"), (3, "outer")],
        (10,),
    ]


async def test_psycopg_async_autocommit_cursor_copy_pipeline(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        seen: list[Any] = []
        async with await _psycopg_aconnect(dsn, autocommit=True) as conn:
            cur = conn.cursor()
            async with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                for i in range(1, 1001):
                    await copy.write_row((i, f"async {i}"))
            async with cur.copy(f"COPY (SELECT id, note FROM {table} ORDER BY id) TO STDOUT") as copy:
                rows = [row async for row in copy.rows()]
            seen.append([len(rows), rows[0], rows[-1]])
            await cur.close()

            async with conn.transaction(), conn.cursor("clients_async_cursor") as named:
                await named.execute(f"SELECT id FROM {table} ORDER BY id")
                seen.append(sum([row[0] async for row in named]))

            with pytest.raises(pg_errors.DivisionByZero):
                async with conn.pipeline():
                    await conn.execute("SELECT 1")
                    await conn.execute("SELECT 1/0")
                    await conn.execute("SELECT 3")
            async with conn.pipeline():
                a = await conn.execute("SELECT %s::int", (7,))
                b = await conn.execute(f"SELECT count(*) FROM {table}")
            seen.append([await a.fetchone(), await b.fetchone(), conn.info.transaction_status])
        return seen

    assert await _on_both_async(postgres, pooler, make_table, scenario) == [
        [1000, ("1", "async 1"), ("1000", "async 1000")],
        sum(range(1, 1001)),
        [(7,), (1000,), TransactionStatus.IDLE],
    ]


# -- asyncpg -------------------------------------------------------------------------------------


async def test_asyncpg_fetch_with_parameters(postgres: EmbeddedPostgres, pooler: RunningPoolerLike) -> None:
    async def scenario(dsn: str, _table: str) -> list[Any]:
        conn = await _asyncpg_connect(dsn)
        try:
            rows = await conn.fetch("SELECT g, $1::text || g FROM generate_series(1, $2::int) AS g", "n", 3)
            row = await conn.fetchrow("SELECT $1::int AS a, $2::text AS b, $3::numeric AS c", 1, "two", 3)
            assert row is not None
            value = await conn.fetchval("SELECT $1::int8 * 2", 2**40)
            null = await conn.fetchval("SELECT $1::text IS NULL", None)
            missing = await conn.fetchrow("SELECT 1 WHERE false")
            status = await conn.execute("SELECT 1 UNION ALL SELECT 2")
            # Two statements with no parameters go through the simple query protocol.
            await conn.execute("SELECT 1; SELECT 2")
            return [[tuple(r) for r in rows], dict(row), value, null, missing, status]
        finally:
            await conn.close()

    direct = await scenario(postgres.dsn(), "")
    pooled = await scenario(pooler.dsn(), "")
    assert (
        pooled
        == direct
        == [
            [(1, "n1"), (2, "n2"), (3, "n3")],
            {"a": 1, "b": "two", "c": 3},
            2**41,
            True,
            None,
            "SELECT 2",
        ]
    )


async def test_asyncpg_executemany(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        conn = await _asyncpg_connect(dsn)
        try:
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"row {i}") for i in range(1000)]
            )
            # A failing batch rolls back as a whole (asyncpg runs it in one implicit transaction).
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(5000, "new"), (1, "dup")])
            return [
                await conn.fetchval(f"SELECT count(*) FROM {table}"),
                await conn.fetchval(f"SELECT count(*) FROM {table} WHERE id = 5000"),
                await conn.fetchval("SELECT 'still usable'"),
            ]
        finally:
            await conn.close()

    assert await _on_both_async(postgres, pooler, make_table, scenario) == [1000, 0, "still usable"]


async def test_asyncpg_copy(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        conn = await _asyncpg_connect(dsn)
        try:
            records = await conn.copy_records_to_table(
                table, records=[(i, f"record {i}") for i in range(1, 1001)], columns=["id", "note"]
            )
            source = io.BytesIO(b"".join(f"{i},csv {i}\n".encode() for i in range(1001, 2001)))
            csv_in = await conn.copy_to_table(table, source=source, format="csv")
            out = io.BytesIO()
            table_out = await conn.copy_from_table(table, output=out, format="csv")
            query_out = io.BytesIO()
            await conn.copy_from_query(
                f"SELECT id, note FROM {table} WHERE id > $1 ORDER BY id LIMIT 2", 1500, output=query_out
            )
            lines = sorted(out.getvalue().decode().splitlines(), key=lambda line: int(line.split(",")[0]))
            return [records, csv_in, table_out, len(lines), lines[0], lines[-1], query_out.getvalue()]
        finally:
            await conn.close()

    assert await _on_both_async(postgres, pooler, make_table, scenario) == [
        "COPY 1000",
        "COPY 1000",
        "COPY 2000",
        2000,
        "1,record 1",
        "2000,csv 2000",
        b"1501\tcsv 1501\n1502\tcsv 1502\n",
    ]


async def test_asyncpg_transactions_and_savepoints(
    postgres: EmbeddedPostgres, pooler: RunningPoolerLike, make_table: Callable[[], str]
) -> None:
    async def scenario(dsn: str, table: str) -> list[Any]:
        conn = await _asyncpg_connect(dsn)
        try:
            async with conn.transaction():
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                await conn.execute(f"INSERT INTO {table} VALUES (1, 'outer')")
                async with conn.transaction():  # SAVEPOINT
                    await conn.execute(f"INSERT INTO {table} VALUES (2, 'inner kept')")
                    with pytest.raises(asyncpg.DivisionByZeroError):
                        async with conn.transaction():  # a nested SAVEPOINT, rolled back
                            await conn.execute(f"INSERT INTO {table} VALUES (3, 'inner dropped')")
                            await conn.execute("SELECT 1/0")
                    assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            # An exception from our own code rolls the whole transaction back.
            with pytest.raises(LookupError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (4, 'rolled back')")
                    raise LookupError("application error")
            # So does one from the server.
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction(isolation="serializable"):
                    await conn.execute(f"INSERT INTO {table} VALUES (5, 'rolled back')")
                    await conn.execute(f"INSERT INTO {table} VALUES (1, 'duplicate')")
            in_tx = conn.is_in_transaction()
            rows = await conn.fetch(f"SELECT id, note FROM {table} ORDER BY id")
            return [in_tx, [tuple(r) for r in rows]]
        finally:
            await conn.close()

    assert await _on_both_async(postgres, pooler, make_table, scenario) == [
        False,
        [(1, "outer"), (2, "inner kept")],
    ]


async def test_asyncpg_cursors_in_transaction(postgres: EmbeddedPostgres, pooler: RunningPoolerLike) -> None:
    async def scenario(dsn: str, _table: str) -> list[Any]:
        conn = await _asyncpg_connect(dsn)
        try:
            async with conn.transaction():
                series = conn.cursor("SELECT generate_series(1, $1::int)", 1000, prefetch=64)
                iterated = [r[0] async for r in series]
                cursor = await conn.cursor("SELECT g FROM generate_series(1, 100) AS g")
                first = await cursor.fetch(5)
                skipped = await cursor.forward(50)
                row = await cursor.fetchrow()
            assert row is not None
            return [len(iterated), sum(iterated), [r[0] for r in first], skipped, row[0]]
        finally:
            await conn.close()

    direct = await scenario(postgres.dsn(), "")
    pooled = await scenario(pooler.dsn(), "")
    assert pooled == direct == [1000, sum(range(1, 1001)), [1, 2, 3, 4, 5], 50, 56]


async def test_asyncpg_large_results(postgres: EmbeddedPostgres, pooler: RunningPoolerLike) -> None:
    big = "x" * LARGE_VALUE_BYTES
    conn = await _asyncpg_connect(pooler.dsn())
    try:
        rows = await conn.fetch(
            "SELECT g, md5(g::text) FROM generate_series(1, $1::int) AS g", LARGE_RESULT_ROWS
        )
        assert len(rows) == LARGE_RESULT_ROWS
        assert sum(r[0] for r in rows) == LARGE_RESULT_ROWS * (LARGE_RESULT_ROWS + 1) // 2
        assert rows[-1][1] == await conn.fetchval("SELECT md5($1::text)", str(LARGE_RESULT_ROWS))
        # One huge parameter in, one huge value out.
        assert await conn.fetchval("SELECT length($1::text)", big) == LARGE_VALUE_BYTES
        assert await conn.fetchval("SELECT repeat('x', $1::int)", LARGE_VALUE_BYTES) == big
        # And the connection is in sync afterwards.
        assert await conn.fetchval("SELECT 'after large'") == "after large"
    finally:
        await conn.close()


async def test_asyncpg_concurrent_clients_share_the_pool(pooler: RunningPoolerLike) -> None:
    # More clients than servers, each running transactions that need their server throughout.
    async def client(n: int) -> list[int]:
        conn = await _asyncpg_connect(pooler.dsn())
        try:
            seen = []
            for _ in range(5):
                async with conn.transaction():
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    await conn.execute("SELECT pg_sleep(0.01)")
                    assert await conn.fetchval("SELECT pg_backend_pid()") == pid
                    seen.append(await conn.fetchval("SELECT $1::int", n))
            return seen
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(n) for n in range(3 * POOL_SIZE)))
    assert results == [[n] * 5 for n in range(3 * POOL_SIZE)]


# -- isolation between clients -------------------------------------------------------------------


async def test_no_state_leaks_between_clients(postgres: EmbeddedPostgres, start_pooler: Runner) -> None:
    pooler = start_pooler(pool_size=1, pool_mode="transaction")
    client_a = await _asyncpg_connect(pooler.dsn())
    try:
        default_timeout = await client_a.fetchval("SHOW statement_timeout")
        await client_a.execute("BEGIN")
        await client_a.execute("SET LOCAL statement_timeout = '1234ms'")
        await client_a.execute("CREATE TEMP TABLE tmp_x (i int) ON COMMIT DROP")
        in_tx = await client_a.fetchrow(
            "SELECT pg_backend_pid() AS pid, current_setting('statement_timeout') AS timeout,"
            " to_regclass('tmp_x') IS NOT NULL AS has_tmp"
        )
        assert in_tx is not None
        await client_a.execute("COMMIT")
        assert (in_tx["timeout"], in_tx["has_tmp"]) == ("1234ms", True)

        # Client A stays connected but idle, so the single server goes to client B.
        async with await _psycopg_aconnect(pooler.dsn(), autocommit=True) as client_b:
            cur = await client_b.execute(
                "SELECT pg_backend_pid(), current_setting('statement_timeout'), to_regclass('tmp_x')"
            )
            assert await cur.fetchone() == (in_tx["pid"], default_timeout, None)
    finally:
        await client_a.close()
    # And a third, unrelated client (psql) finds the server as clean.
    after = _psql(postgres, pooler.port, "-A", "-t", "-c", "SELECT current_setting('statement_timeout')")
    assert (after.returncode, after.stdout.strip()) == (0, default_timeout)
