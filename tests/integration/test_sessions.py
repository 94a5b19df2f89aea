"""Transaction mode without surprises: session parameters, startup options, cancel, session state.

Most tests use a pool of one server, so every client provably shares it (same backend pid), and
check that each client sees only its own session.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from pypooler.embedded import EmbeddedPostgres
from pypooler.log_limits import INTERVAL_S, LINES_PER_INTERVAL
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from tests.support.messages import query
from tests.support.pgwire import RawClient, data_rows, error_fields
from tests.support.prometheus import sample, scrape
from tests.support.waiting import wait_until

CONNECT_TIMEOUT_S = 30
CANCEL_WITHIN_S = 1.0
LONG_SLEEP = "SELECT pg_sleep(30)"

# --------------------------------------------------------------------------- session parameters


async def test_clients_with_different_settings_alternate_on_one_server(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    first = await asyncpg.connect(
        pooler.dsn(), timeout=CONNECT_TIMEOUT_S,
        server_settings={
            "application_name": "first", "TimeZone": "America/New_York", "DateStyle": "SQL, DMY",
        },
    )  # fmt: skip
    second = await psycopg.AsyncConnection.connect(
        pooler.dsn(application_name="second"), autocommit=True, options="-c TimeZone=Asia/Tokyo"
    )
    sql = "SELECT pg_backend_pid(), current_setting('application_name'), current_setting('TimeZone')," \
          " current_setting('DateStyle')"  # fmt: skip
    try:
        pids = set()
        for round_number in range(3):
            row = await first.fetchrow(sql)
            assert row is not None
            pids.add(row[0])
            assert tuple(row)[1:] == ("first", "America/New_York", "SQL, DMY")
            cursor = await second.execute(sql)
            seen = await cursor.fetchone()
            assert seen is not None
            pids.add(seen[0])
            assert seen[1:] == ("second", "Asia/Tokyo", "ISO, MDY")
            if round_number == 1:
                # A plain SET of a reported setting follows its client, not the server.
                await second.execute("SET TimeZone = 'Europe/Paris'")
                await second.execute("SELECT 1")
                row = await first.fetchrow(sql)
                assert row is not None and row[2] == "America/New_York"
                cursor = await second.execute(sql)
                seen = await cursor.fetchone()
                assert seen is not None and seen[2] == "Europe/Paris"
                await second.execute("SET TimeZone = 'Asia/Tokyo'")
        assert len(pids) == 1  # one server all along
        assert second.info.parameter_status("TimeZone") == "Asia/Tokyo"
    finally:
        await first.close()
        await second.close()


async def test_startup_options_are_applied_per_client(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    options = "-c statement_timeout=4321 -c work_mem=1234kB"
    timed = await RawClient.login(pooler.host, pooler.port, options=options)
    custom_settings = {"pypooler.test": "café", "extra_float_digits": "3"}
    custom = await RawClient.login(pooler.host, pooler.port, **custom_settings)
    plain = await RawClient.login(pooler.host, pooler.port)
    sql = "SELECT current_setting('statement_timeout'), current_setting('work_mem')," \
          " current_setting('pypooler.test', true), current_setting('extra_float_digits')"  # fmt: skip
    try:
        for _ in range(2):
            # (Once a server has seen a custom setting, RESET leaves it empty rather than unset.)
            assert data_rows(await timed.query(sql))[0][:2] == ["4321ms", "1234kB"]
            # extra_float_digits is in ignore_startup_parameters: accepted, not applied.
            assert data_rows(await custom.query(sql)) == [["0", "4MB", "café", "1"]]
            row = data_rows(await plain.query(sql))[0]
            assert row[:2] == ["0", "4MB"] and row[2] in (None, "") and row[3] == "1"
    finally:
        for client in (timed, custom, plain):
            await client.close()


async def test_startup_options_in_session_mode(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, pool_mode="session")
    sql = "SELECT current_setting('statement_timeout'), current_setting('application_name')"
    timed = await RawClient.login(pooler.host, pooler.port, options="-c statement_timeout=4321",
                                  application_name="timed")  # fmt: skip
    assert data_rows(await timed.query(sql)) == [["4321ms", "timed"]]
    await timed.close()
    plain = await RawClient.login(pooler.host, pooler.port)
    try:
        assert data_rows(await plain.query(sql)) == [["0", ""]]
    finally:
        await plain.close()


# Ways back to a setting's session default; PostgreSQL's default is the startup value.
RESETS = (
    "RESET statement_timeout", "SET statement_timeout TO DEFAULT", "RESET TimeZone",
    "SET TIME ZONE DEFAULT", "RESET ALL", "DISCARD ALL",
)  # fmt: skip
READ_SETTINGS = "SELECT current_setting('statement_timeout'), current_setting('TimeZone')"


def resets_seen(dsn: str) -> tuple[list[tuple[Any, ...]], tuple[Any, ...], tuple[Any, ...]]:
    """With startup settings statement_timeout and TimeZone: (what each of RESETS, run on its
    own, leaves for the next statement, with the TimeZone the client was told; what RESET ALL
    leaves inside its own transaction; what follows that transaction)."""
    options = "-c statement_timeout=5s -c TimeZone=Asia/Tokyo"
    with psycopg.connect(dsn, autocommit=True, options=options, connect_timeout=10) as conn:
        after_each = []
        for reset in RESETS:
            conn.execute("SET TimeZone = 'America/Lima'")
            conn.execute(reset)
            row = conn.execute(READ_SETTINGS).fetchone()
            assert row is not None
            after_each.append((reset, *row, conn.info.parameter_status("TimeZone")))
        with conn.transaction():
            conn.execute("RESET ALL")
            in_transaction = conn.execute(READ_SETTINGS).fetchone()
        after_transaction = conn.execute(READ_SETTINGS).fetchone()
    assert in_transaction is not None and after_transaction is not None
    return after_each, in_transaction, after_transaction


def test_reset_returns_to_startup_values_from_the_next_transaction(
    postgres: EmbeddedPostgres, start_pooler: Any
) -> None:
    pooler = start_pooler(pool_size=1)
    direct = resets_seen(postgres.dsn())
    pooled = resets_seen(pooler.dsn())
    assert direct[0] == [
        ("RESET statement_timeout", "5s", "America/Lima", "America/Lima"),
        ("SET statement_timeout TO DEFAULT", "5s", "America/Lima", "America/Lima"),
        ("RESET TimeZone", "5s", "Asia/Tokyo", "Asia/Tokyo"),
        ("SET TIME ZONE DEFAULT", "5s", "Asia/Tokyo", "Asia/Tokyo"),
        ("RESET ALL", "5s", "Asia/Tokyo", "Asia/Tokyo"),
        ("DISCARD ALL", "5s", "Asia/Tokyo", "Asia/Tokyo"),
    ]
    # From the next transaction on, pypooler gives back what PostgreSQL keeps (and says so).
    assert pooled[0] == direct[0]
    assert pooled[2] == direct[2] == ("5s", "Asia/Tokyo")
    # Inside the transaction that ran it, RESET reaches the server's defaults (a limit).
    assert direct[1] == ("5s", "Asia/Tokyo")
    with psycopg.connect(postgres.dsn(), autocommit=True, connect_timeout=10) as plain:
        defaults = plain.execute(READ_SETTINGS).fetchone()
        assert defaults is not None and defaults[1] != "Asia/Tokyo"
    assert pooled[1] == defaults
    # Nothing of it stays on the server for the next client.
    with psycopg.connect(pooler.dsn(), autocommit=True, connect_timeout=10) as other:
        assert other.execute(READ_SETTINGS).fetchone() == defaults


# Startup values spelled otherwise than PostgreSQL reports them (drivers compare the reports:
# pgjdbc wants DateStyle to start with "ISO").
RESPELLED = {"client_encoding": "eucjp", "DateStyle": "iso, dmy", "TimeZone": "europe/rome"}
REPORTED = ("client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "application_name")


def reported(messages: list[tuple[int, bytes]]) -> dict[str, str]:
    statuses = dict(
        codec.parse_parameter_status(body) for msg_type, body in messages if msg_type == c.B_PARAMETER_STATUS
    )
    return {name: statuses[name] for name in REPORTED if name in statuses}


async def welcome(
    host: str, port: int, parameters: dict[str, str]
) -> tuple[RawClient, list[tuple[int, bytes]]]:
    client = await RawClient.connect(host, port)
    client.send(codec.build_startup_message({"user": "postgres", "database": "pypooler_test", **parameters}))
    return client, await client.until_ready()


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
@pytest.mark.parametrize(
    "parameters",
    [
        RESPELLED,
        {"DateStyle": "dmy"},  # on top of the server's default: ISO, DMY
        {"options": "-c timezone=europe/rome -c intervalstyle=SQL_STANDARD"},
        {"application_name": "caf\u00e9\u0001"},  # PostgreSQL makes it ASCII: "caf???"
    ],
)
async def test_reported_settings_are_reported_as_postgresql_spells_them(
    postgres: EmbeddedPostgres, start_pooler: Any, parameters: dict[str, str], pool_mode: str
) -> None:
    pooler = start_pooler(pool_size=1, pool_mode=pool_mode)
    # In session mode a RESET returns to the server's defaults (a limit, see the README).
    statements = ["SET TimeZone = 'america/new_york'", "SET DateStyle = 'sql, ymd'"]
    if pool_mode == "transaction":
        statements.append("RESET ALL")
    for attempt in range(2):  # the second login comes from the pool's cache
        direct, direct_welcome = await welcome(postgres.host, postgres.port, parameters)
        pooled, pooled_welcome = await welcome(pooler.host, pooler.port, parameters)
        try:
            expected, seen = reported(direct_welcome), reported(pooled_welcome)
            assert seen == expected, attempt
            # SET and RESET later on: the server's spelling (RESET's value at the latest once
            # the transaction is over, see the README's limits).
            for sql in statements:
                expected.update(reported(await direct.query(sql)))
                seen.update(reported(await pooled.query(sql)))
                seen.update(reported(await pooled.query("SELECT 1")))
                assert seen == expected, (attempt, sql)
        finally:
            await direct.close()
            await pooled.close()


@pytest.mark.parametrize(
    "parameters",
    [{"TimeZone": "Mars/Olympus_Mons"}, {"DateStyle": "nope"}, {"client_encoding": "no_such_encoding"}],
)
async def test_a_reported_setting_postgresql_refuses_is_refused_at_login_with_its_error(
    postgres: EmbeddedPostgres, start_pooler: Any, parameters: dict[str, str]
) -> None:
    pooler = start_pooler(pool_size=1)
    for _ in range(2):
        direct, direct_reply = await welcome(postgres.host, postgres.port, parameters)
        pooled, pooled_reply = await welcome(pooler.host, pooler.port, parameters)
        await direct.close()
        await pooled.close()
        expected, seen = error_fields(direct_reply), error_fields(pooled_reply)
        assert expected is not None and seen is not None
        assert {k: seen.get(k) for k in "SCMD"} == {k: expected.get(k) for k in "SCMD"}
    # The server went back to the pool clean.
    other = await RawClient.login(pooler.host, pooler.port)
    plain = await RawClient.login(postgres.host, postgres.port)
    try:
        sql = "SHOW TimeZone; SHOW DateStyle; SHOW client_encoding"
        assert data_rows(await other.query(sql)) == data_rows(await plain.query(sql))
    finally:
        await other.close()
        await plain.close()


async def test_a_new_reported_value_waits_for_a_server_once_per_pool(start_pooler: Any) -> None:
    # A limit: the spelling of a value never seen in the pool is learned from a server, so that
    # first login waits while every server is held; PostgreSQL would not make it wait.
    pooler = start_pooler(pool_size=1)
    holder = await RawClient.login(pooler.host, pooler.port)
    try:
        await holder.query("BEGIN")
        login = asyncio.create_task(RawClient.login(pooler.host, pooler.port, TimeZone="europe/rome"))
        await asyncio.sleep(0.5)
        assert not login.done()
        # A value that is the server's default however it is spelled needs no server.
        default = await RawClient.login(pooler.host, pooler.port, client_encoding="utf-8")
        assert default.parameters["client_encoding"] == "UTF8"
        await default.close()
        await holder.query("COMMIT")
        waited = await asyncio.wait_for(login, 10)
        assert waited.parameters["TimeZone"] == "Europe/Rome"
        await waited.close()
        # Learned: the next such login does not wait, even with the server held.
        await holder.query("BEGIN")
        again = await asyncio.wait_for(RawClient.login(pooler.host, pooler.port, TimeZone="europe/rome"), 2)
        assert again.parameters["TimeZone"] == "Europe/Rome"
        await again.close()
        await holder.query("COMMIT")
    finally:
        await holder.close()


def test_reset_in_session_mode_returns_to_the_servers_defaults(start_pooler: Any) -> None:
    """Session mode applies startup settings with SQL once, and does not read the client's
    statements: a RESET there returns to the server's defaults for the rest of the session."""
    pooler = start_pooler(pool_size=1, pool_mode="session")
    options = "-c statement_timeout=5s -c TimeZone=Asia/Tokyo"
    with psycopg.connect(pooler.dsn(), autocommit=True, options=options, connect_timeout=10) as conn:
        assert conn.execute(READ_SETTINGS).fetchone() == ("5s", "Asia/Tokyo")
        conn.execute("RESET ALL")
        for _ in range(2):
            row = conn.execute(READ_SETTINGS).fetchone()
            assert row is not None and row[0] == "0" and row[1] != "Asia/Tokyo"


@pytest.mark.parametrize(
    ("parameters", "sqlstate", "message"),
    [
        (
            {"options": "-c statement_timeout=soon"},
            "22023",
            'invalid value for parameter "statement_timeout"',
        ),
        ({"TimeZone": "Mars/Olympus_Mons"}, "22023", 'invalid value for parameter "TimeZone"'),
        ({"no_such_setting": "1"}, "42704", 'unrecognized configuration parameter "no_such_setting"'),
        ({"options": "-e"}, "0A000", 'unsupported startup option "-e"'),
        ({"replication": "database"}, "0A000", "replication connections are not supported"),
    ],
)
async def test_startup_parameters_that_cannot_be_applied_are_refused(
    start_pooler: Any, parameters: dict[str, str], sqlstate: str, message: str
) -> None:
    pooler = start_pooler(pool_size=1)
    try:
        client = await RawClient.login(pooler.host, pooler.port, **parameters)
    except AssertionError as exc:  # refused at login
        fields = exc.args[0]
    else:
        # Settings PostgreSQL must judge are refused when first applied, before any statement.
        fields = error_fields(await client.query("SELECT 1"))
        await client.close()
    assert fields is not None
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate)
    assert message in fields["M"]
    # The server went back to the pool clean.
    other = await RawClient.login(pooler.host, pooler.port)
    reply = await other.query("SELECT current_setting('TimeZone') <> 'Mars/Olympus_Mons'")
    assert data_rows(reply) == [["t"]]
    await other.close()


async def test_a_client_retrying_a_refused_replication_login_writes_a_bounded_log(
    start_pooler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A replication client retrying in a loop once wrote 64,580 identical WARNING lines in ten
    # minutes: now at most LINES_PER_INTERVAL, then one summary when the interval is over.
    pooler = start_pooler(pool_size=1)
    attempts = 200
    for _ in range(attempts):
        try:
            client = await RawClient.login(pooler.host, pooler.port, replication="database")
        except AssertionError as exc:
            assert exc.args[0]["C"] == "0A000"  # every client is still told why
        else:
            await client.close()
            pytest.fail("a replication login was let in")

    refused = [r for r in caplog.records if "replication connections are not supported" in r.getMessage()]
    assert len(refused) == LINES_PER_INTERVAL
    limiter = pooler.pooler.manager.log_limiter
    pooler.call(lambda: limiter.flush(time.monotonic_ns() + int(INTERVAL_S * 1e9)))
    summaries = [r for r in caplog.records if "similar lines suppressed" in r.getMessage()]
    assert len(summaries) == 1
    assert summaries[0].getMessage().startswith(f"{attempts - LINES_PER_INTERVAL} similar lines suppressed")
    assert "replication connections are not supported" in summaries[0].getMessage()


# --------------------------------------------------------------------------- cancel


def test_psql_cancels_through_pypooler(postgres: EmbeddedPostgres, start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    env = postgres.env()
    env["PGPASSFILE"] = "/nonexistent/pypooler-tests/pgpass"
    psql = subprocess.Popen(
        [postgres.bin("psql"), "-X", "-h", pooler.host, "-p", str(pooler.port), "-U", "postgres",
         "-d", "pypooler_test", "-c", LONG_SLEEP],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until_running(postgres)
        started = time.monotonic()
        psql.send_signal(signal.SIGINT)
        _, stderr = psql.communicate(timeout=10)
        assert time.monotonic() - started < CANCEL_WITHIN_S
        assert "canceling statement due to user request" in stderr
    finally:
        if psql.poll() is None:
            psql.kill()
            psql.wait()


async def test_asyncpg_cancels_through_pypooler(postgres: EmbeddedPostgres, start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    conn = await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            # On timeout asyncpg sends a CancelRequest and waits for the query to end.
            await conn.fetchval(LONG_SLEEP, timeout=0.3)
        assert await conn.fetchval("SELECT 'usable'") == "usable"
        assert time.monotonic() - started < 0.3 + CANCEL_WITHIN_S
    finally:
        await conn.close()


def test_psycopg_cancels_through_pypooler(postgres: EmbeddedPostgres, start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    with psycopg.connect(pooler.dsn(), autocommit=True, connect_timeout=10) as conn:
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(pg_errors.QueryCanceled):
            conn.execute(LONG_SLEEP)
        timer.join()
        assert time.monotonic() - started < 0.3 + CANCEL_WITHIN_S
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


async def test_the_login_backend_pid_is_pypoolers_own_key(start_pooler: Any) -> None:
    """README limits: the BackendKeyData pid is pypooler's key, not a PostgreSQL backend, so
    pg_terminate_backend of it is refused by PostgreSQL and ends nothing."""
    pooler = start_pooler(pool_size=2)
    conn = await asyncpg.connect(pooler.dsn())
    try:
        login_pid = conn.get_server_pid()
        assert await conn.fetchval("SELECT pg_backend_pid()") != login_pid
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", login_pid) is False
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_a_cancel_racing_the_end_of_a_transaction_never_cancels_the_next_borrower(
    start_pooler: Any,
) -> None:
    pooler = start_pooler(pool_size=1)
    first = await RawClient.login(pooler.host, pooler.port)
    second = await RawClient.login(pooler.host, pooler.port)
    try:
        for attempt in range(15):
            # The first client's query ends while its cancel is on its way; the second client
            # is queued for the same server and must get it only after the cancel is spent.
            first.send(query("SELECT 1"))
            cancel = asyncio.create_task(first.cancel(pooler.host, pooler.port))
            await asyncio.sleep(attempt * 0.0005)
            second.send(query("SELECT pg_sleep(0.05), 'second'"))
            await first.until_ready()
            await cancel
            reply = await second.until_ready()
            assert error_fields(reply) is None, (attempt, error_fields(reply))
            assert data_rows(reply) == [["", "second"]]
        # And a cancel from a client that holds no server sends nothing.
        second.send(query("SELECT pg_sleep(0.2), 'not cancelled'"))
        await asyncio.sleep(0.05)
        await first.cancel(pooler.host, pooler.port)
        assert data_rows(await second.until_ready()) == [["", "not cancelled"]]
    finally:
        await first.close()
        await second.close()


def wait_until_running(postgres: EmbeddedPostgres, timeout: float = 10) -> None:
    running = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
    wait_until(lambda: postgres.psql(running).strip() == "1", timeout, 0.02, "the query never started")


# --------------------------------------------------------------------------- session state

# (statement, a query whose answer is "t" on a server that still has the state)
SESSION_STATE = {
    "set": ("SET statement_timeout = '4321ms'", "SELECT current_setting('statement_timeout') = '4321ms'"),
    "set_config": (
        "SELECT set_config('statement_timeout', '4321ms', false)",
        "SELECT current_setting('statement_timeout') = '4321ms'",
    ),
    "advisory_lock": (
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
        " AND pid = pg_backend_pid()",
    ),
    "temp_table": ("CREATE TEMP TABLE leaked (i int)", "SELECT to_regclass('pg_temp.leaked') IS NOT NULL"),
    "listen": ("LISTEN leaked", "SELECT 'leaked' IN (SELECT pg_listening_channels())"),
    "with_hold": (
        "DECLARE leaked CURSOR WITH HOLD FOR SELECT 1",
        "SELECT count(*) > 0 FROM pg_cursors WHERE name = 'leaked'",
    ),
    "prepare": (
        "PREPARE leaked AS SELECT 1",
        "SELECT count(*) > 0 FROM pg_prepared_statements WHERE name = 'leaked'",
    ),
}


@pytest.mark.parametrize("kind", SESSION_STATE)
async def test_session_state_policy_log(
    start_pooler: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    statement, leaked = SESSION_STATE[kind]
    pooler = start_pooler(pool_size=1, session_state_policy="log", listen_mode="session_state")
    client = await RawClient.login(pooler.host, pooler.port, application_name="leaky")
    other = await RawClient.login(pooler.host, pooler.port)
    try:
        with caplog.at_level(logging.WARNING, logger="pypooler.client"):
            assert error_fields(await client.query(statement)) is None
            await client.query(statement)  # seen again (it may fail: "already exists")
        # The state leaks, as documented, but it was reported: once per application and kind.
        assert data_rows(await other.query(leaked)) == [["t"]]
        warnings = [r.getMessage() for r in caplog.records if "app=leaky" in r.getMessage()]
        assert len(warnings) == 1 and "inherits" in warnings[0]
        assert pooler.call(lambda: pooler.pool().stats.apps["leaky"].session_state[kind]) == 2
        metrics = scrape(pooler.metrics_url)["pypooler_session_state_statements"]
        assert sample(metrics, "pypooler_session_state_statements_total", application_name="leaky",
                      kind=kind) == 2  # fmt: skip
    finally:
        await client.close()
        await other.close()


@pytest.mark.parametrize("kind", SESSION_STATE)
async def test_session_state_policy_error(start_pooler: Any, kind: str) -> None:
    statement, leaked = SESSION_STATE[kind]
    pooler = start_pooler(pool_size=1, session_state_policy="error", listen_mode="session_state")
    client = await RawClient.login(pooler.host, pooler.port)
    other = await RawClient.login(pooler.host, pooler.port)
    try:
        fields = error_fields(await client.query(statement))
        assert fields is not None and (fields["S"], fields["C"]) == ("ERROR", "0A000")
        assert "session state" in fields["M"] and "session_state_policy" in fields["H"]
        # Inside a transaction block the block fails, as with any error.
        await client.query("BEGIN")
        reply = await client.query(statement)
        assert error_fields(reply) is not None and reply[-1][1] == b"E"
        await client.query("ROLLBACK")
        assert data_rows(await client.query("SELECT 'still usable'")) == [["still usable"]]
        assert data_rows(await other.query(leaked)) == [["f"]]
    finally:
        await client.close()
        await other.close()


@pytest.mark.parametrize("kind", SESSION_STATE)
async def test_session_state_policy_pin(start_pooler: Any, kind: str) -> None:
    statement, leaked = SESSION_STATE[kind]
    pooler = start_pooler(pool_size=2, session_state_policy="pin", listen_mode="session_state")
    client = await RawClient.login(pooler.host, pooler.port)
    other = await RawClient.login(pooler.host, pooler.port)
    try:
        pinned_pid = data_rows(await client.query("SELECT pg_backend_pid()"))[0][0]
        assert error_fields(await client.query(statement)) is None
        assert data_rows(await client.query(leaked)) == [["t"]]  # the client keeps its state
        assert pooler.call(lambda: pooler.pool().stats.totals().pinned) == 1
        assert sample(scrape(pooler.metrics_url)["pypooler_pinned_clients_now"],
                      "pypooler_pinned_clients_now") == 1  # fmt: skip
        for _ in range(3):
            reply = await other.query(f"SELECT pg_backend_pid()::text <> '{pinned_pid}', ({leaked})")
            assert data_rows(reply) == [["t", "f"]]  # never that server, never that state
        await client.close()
        await asyncio.sleep(0.2)  # the server is reset (DISCARD ALL) and goes back to the pool
        assert pooler.call(lambda: pooler.pool().stats.totals().pinned) == 0
        second = await RawClient.login(pooler.host, pooler.port)
        try:
            await second.query("BEGIN")  # hold one server, so `other` gets the reset one next
            for _ in range(2):
                assert data_rows(await other.query(leaked)) == [["f"]]
            await second.query("COMMIT")
        finally:
            await second.close()
    finally:
        await client.close()
        await other.close()


async def test_transaction_scoped_state_is_not_session_state(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, session_state_policy="error")
    client = await RawClient.login(pooler.host, pooler.port)
    other = await RawClient.login(pooler.host, pooler.port)
    try:
        for sql in (
            "BEGIN", "SET LOCAL statement_timeout = '4321ms'",
            "SELECT set_config('work_mem', '1234kB', true)", "SELECT pg_advisory_xact_lock(4242)",
            "CREATE TEMP TABLE scoped (i int) ON COMMIT DROP", "DECLARE scoped CURSOR FOR SELECT 1",
            "COMMIT",
        ):  # fmt: skip
            assert error_fields(await client.query(sql)) is None, sql
        reply = await other.query(
            "SELECT current_setting('statement_timeout'), current_setting('work_mem'),"
            " to_regclass('pg_temp.scoped'), (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')"
        )
        assert data_rows(reply) == [["0", "4MB", None, "0"]]
    finally:
        await client.close()
        await other.close()


@pytest.mark.parametrize("mode", ["session", "statement"])
async def test_prepared_statements_and_settings_in_other_modes(start_pooler: Any, mode: str) -> None:
    pooler = start_pooler(pool_size=1, pool_mode=mode)

    async def client(number: int) -> list[Any]:
        conn = await asyncpg.connect(
            pooler.dsn(), timeout=CONNECT_TIMEOUT_S, server_settings={"application_name": f"app{number}"}
        )
        try:
            return [
                await conn.fetchval("SELECT $1::int * 2", number),
                await conn.fetchval("SELECT current_setting('application_name')"),
                await conn.fetchval("SELECT $1::int * 2", number + 1),
            ]
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(n) for n in range(4)))
    assert results == [[n * 2, f"app{n}", n * 2 + 2] for n in range(4)]
