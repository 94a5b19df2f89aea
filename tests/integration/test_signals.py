"""Signals sent to a real `pypooler run` process: SIGHUP reloads, SIGTERM drains, SIGINT drains
faster, a second signal exits at once (see pypooler/cli.py and Pooler.drain for the rules)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pypooler.config import load_settings
from pypooler.embedded import EmbeddedPostgres
from tests.support.processes import PoolerFactory, connect, free_port, http_status, metric

ADMIN_SHUTDOWN = "57P01"


@pytest.fixture
def pooler_factory(tmp_path: Path, postgres: EmbeddedPostgres) -> Iterator[PoolerFactory]:
    factory = PoolerFactory(tmp_path, postgres)
    yield factory
    for process in factory.started:
        process.stop()


def test_sighup_reloads_without_dropping_clients(pooler_factory: PoolerFactory) -> None:
    process, config, dsn, metrics = pooler_factory()
    with connect(dsn, autocommit=True) as held, connect(dsn) as in_transaction:
        held.execute("SELECT 1")
        in_transaction.execute("SELECT 1")  # a transaction stays open across the reload
        assert metric(metrics, "pypooler_pool_size") == 2

        config.write_text(config.read_text().replace("pool_size = 2", "pool_size = 5"))
        process.signal(signal.SIGHUP)
        process.wait_for(r"reloaded configuration: .*pool_size 2 -> 5")
        assert metric(metrics, "pypooler_pool_size") == 5
        assert held.execute("SELECT 6 * 7").fetchone() == (42,)
        in_transaction.execute("SELECT 2")
        in_transaction.commit()

        # A broken file is reported and the running configuration kept.
        config.write_text(config.read_text() + "pool_mode = 'nonsense'\n")
        process.signal(signal.SIGHUP)
        process.wait_for(r"reload failed, old configuration kept: .*pool_mode")
        assert held.execute("SELECT 1").fetchone() == (1,)
        assert metric(metrics, "pypooler_pool_size") == 5
    assert process.proc.poll() is None


def test_sigterm_drains_running_transactions_then_exits_0(pooler_factory: PoolerFactory) -> None:
    process, _, dsn, metrics = pooler_factory(shutdown_drain_timeout=20)
    idle = connect(dsn, autocommit=True)
    busy = connect(dsn)
    try:
        idle.execute("SELECT 1")
        busy.execute("CREATE TEMP TABLE drained (n int) ON COMMIT DROP")
        busy.execute("INSERT INTO drained VALUES (1)")
        assert http_status(metrics + "/readyz") == 200

        process.signal(signal.SIGTERM)
        process.wait_for(r"draining: 2 clients, 1 inside a transaction")
        assert http_status(metrics + "/readyz") == 503  # load balancers stop sending clients
        assert http_status(metrics + "/healthz") == 200  # but the process is alive
        # A client between transactions is closed at once, with the reason.
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            connect(dsn)  # no longer accepting

        # The running transaction finishes normally.
        assert busy.execute("SELECT count(*) FROM drained").fetchone() == (1,)
        busy.commit()
        assert process.proc.wait(10) == 0
        process.wait_for(r"drained: no transaction running")
        with pytest.raises(psycopg.OperationalError):
            busy.execute("SELECT 1")
    finally:
        idle.close()
        busy.close()


def test_new_transaction_during_drain_is_refused_with_admin_shutdown(pooler_factory: PoolerFactory) -> None:
    process, _, dsn, _ = pooler_factory(shutdown_drain_timeout=20)
    with connect(dsn) as busy, connect(dsn) as other:
        busy.execute("SELECT 1")  # holds one of the 2 servers in a transaction
        other.execute("SELECT 1")  # holds the other
        third = connect(dsn, autocommit=True)  # logged in, waits for a server
        waiter = threading.Thread(target=lambda: _expect_shutdown(third), daemon=True)
        waiter.start()
        time.sleep(0.3)  # third is queued for a server
        process.signal(signal.SIGTERM)
        waiter.join(10)
        assert not waiter.is_alive()
        busy.rollback()
        other.commit()
    assert process.proc.wait(10) == 0


def _expect_shutdown(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    with pytest.raises(psycopg.OperationalError) as excinfo:
        conn.execute("SELECT 1")
    assert excinfo.value.sqlstate == ADMIN_SHUTDOWN or "shutting down" in str(excinfo.value)
    conn.close()


def test_drain_timeout_bounds_a_transaction_that_never_ends(pooler_factory: PoolerFactory) -> None:
    process, _, dsn, _ = pooler_factory(shutdown_drain_timeout=1)
    stuck = connect(dsn)
    try:
        stuck.execute("SELECT 1")  # and never commits
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        assert process.proc.wait(10) == 0
        assert 0.9 <= time.monotonic() - started < 5
        process.wait_for(r"drain timeout \(1 s\): closing 1 clients inside a transaction")
    finally:
        stuck.close()  # the pooler closed it; close() only tidies up


def test_sigint_drains_faster(pooler_factory: PoolerFactory) -> None:
    process, _, dsn, _ = pooler_factory(shutdown_drain_timeout=30)
    stuck = connect(dsn)
    try:
        stuck.execute("SELECT 1")
        started = time.monotonic()
        process.signal(signal.SIGINT)
        assert process.proc.wait(10) == 0
        assert time.monotonic() - started < 5  # not the 30 s SIGTERM would allow
    finally:
        stuck.close()  # the pooler closed it; close() only tidies up


def test_second_signal_exits_at_once(pooler_factory: PoolerFactory) -> None:
    process, _, dsn, _ = pooler_factory(shutdown_drain_timeout=30)
    stuck = connect(dsn)
    try:
        stuck.execute("SELECT 1")
        process.signal(signal.SIGTERM)
        process.wait_for(r"draining: ")
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        assert process.proc.wait(10) == 1
        assert time.monotonic() - started < 3
        process.wait_for(r"SIGTERM again: closing every connection now")
    finally:
        stuck.close()  # the pooler closed it; close() only tidies up


def test_reload_adds_a_database_and_keeps_socket_settings(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    """The same Pooler.reload that SIGHUP calls, in-process: a new database is served at once;
    the listening port needs a restart and stays."""
    pooler = start_pooler(listen_port=free_port(), metrics_port=free_port(), databases={})
    with pytest.raises(psycopg.OperationalError, match="pypooler_test"):
        connect(pooler.dsn())
    new = load_settings(
        None, env={}, listen_port=pooler.port + 1, log_connections=False, log_level="DEBUG",
        databases={"pypooler_test": {"host": postgres.host, "port": postgres.port}},
    )  # fmt: skip
    package_logger = logging.getLogger("pypooler")
    level = package_logger.level
    try:
        assert pooler.call(lambda: pooler.pooler.reload(new)) is True

        with connect(pooler.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pooler.pooler.settings.listen_port == pooler.port
        assert package_logger.level == logging.DEBUG  # the log level reloads
    finally:
        package_logger.setLevel(level)


def test_sigterm_closes_a_pinned_client_at_rest_at_once(pooler_factory: PoolerFactory) -> None:
    """A client pinned by session_state_policy = "pin" keeps its server between transactions,
    as a session-mode client does: at rest it is closed at once, not at the drain timeout."""
    process, _, dsn, _ = pooler_factory(shutdown_drain_timeout=30, session_state_policy='"pin"')
    pinned = connect(dsn, autocommit=True)
    try:
        pinned.execute("SET work_mem = '8MB'")  # session state: pinned to its server from here
        process.wait_for(r"keeps its server until it disconnects")
        assert pinned.execute("SHOW work_mem").fetchone() == ("8MB",)  # still its server
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        process.wait_for(r"draining: 1 clients, 0 inside a transaction")
        assert process.proc.wait(10) == 0
        assert time.monotonic() - started < 5  # not the 30 s drain timeout
        with pytest.raises(psycopg.OperationalError):
            pinned.execute("SELECT 1")
    finally:
        pinned.close()


def test_sigint_ends_a_client_in_a_query_with_admin_shutdown(pooler_factory: PoolerFactory) -> None:
    """SIGINT's fast drain ends what is still running with PostgreSQL's FATAL 57P01, as the
    end of SIGTERM's drain does, never with a bare close."""
    process, _, dsn, _ = pooler_factory(shutdown_drain_timeout=30)
    in_query = connect(dsn, autocommit=True)
    idle_in_transaction = connect(dsn)
    errors: list[BaseException] = []

    def run_query() -> None:
        try:
            in_query.execute("SELECT pg_sleep(3)")
        except BaseException as exc:
            errors.append(exc)

    try:
        idle_in_transaction.execute("SELECT 1")  # a transaction left open
        query = threading.Thread(target=run_query, daemon=True)
        query.start()
        time.sleep(0.3)  # the query runs
        process.signal(signal.SIGINT)
        query.join(10)
        assert process.proc.wait(10) == 0
        (error,) = errors
        assert isinstance(error, psycopg.OperationalError)
        assert error.sqlstate == ADMIN_SHUTDOWN
        assert "terminating connection due to administrator command" in str(error)
        with pytest.raises(psycopg.OperationalError) as excinfo:
            idle_in_transaction.execute("SELECT 2")
        # Sent while it was idle: libpq reads it at the next statement (or sees the close first).
        assert excinfo.value.sqlstate == ADMIN_SHUTDOWN or "administrator command" in str(excinfo.value)
    finally:
        in_query.close()
        idle_in_transaction.close()
