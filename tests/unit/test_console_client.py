"""Tests for pypooler.console_client's pure parts: which conninfo `pypooler advise` hands libpq
(command line, then libpq's environment, then pypooler's settings), and libpq's errors as one
line. Logging in for real is tests/integration/test_advise_command.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from pypooler.config import load_settings
from pypooler.console_client import CONNECT_TIMEOUT_S, ConsoleError, console_conninfo, one_line


def conninfo(
    environ: dict[str, str] | None = None, settings: dict[str, Any] | None = None, **options: Any
) -> Any:
    return conninfo_to_dict(
        console_conninfo(load_settings(env={}, **(settings or {})), environ or {}, **options)
    )


def test_pypoolers_settings_say_where_the_console_is() -> None:
    assert conninfo() == {
        "dbname": "pgbouncer", "host": "/tmp", "port": "6432", "user": "postgres",
        "connect_timeout": str(CONNECT_TIMEOUT_S),
    }  # fmt: skip
    mine = {"unix_socket_dir": "/run/pypooler", "listen_port": 7000, "admin_users": ["ops", "postgres"]}
    assert conninfo(settings=mine)["host"] == "/run/pypooler"
    assert conninfo(settings=mine)["port"] == "7000"
    assert conninfo(settings=mine)["user"] == "ops"
    assert conninfo(settings={"admin_users": [], "stats_users": ["watcher"]})["user"] == "watcher"
    assert "user" not in conninfo(settings={"admin_users": []})  # libpq's: the OS user


@pytest.mark.parametrize(
    ("listen_addr", "host"),
    [("10.0.0.5", "10.0.0.5"), ("*", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "::1")],
)
def test_without_a_unix_socket_the_console_is_reached_on_the_listen_address(
    listen_addr: str, host: str
) -> None:
    assert conninfo(settings={"unix_socket_dir": "", "listen_addr": listen_addr})["host"] == host


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_a_pooler_requiring_tls_is_still_reached_over_its_unix_socket(mode: str, tmp_path: Path) -> None:
    files = {}
    for setting in ("client_tls_cert_file", "client_tls_key_file", "client_tls_ca_file"):
        (tmp_path / setting).touch()  # the settings check that they exist; nothing reads them here
        files[setting] = str(tmp_path / setting)
    assert conninfo(settings={"client_tls_sslmode": mode, **files})["host"] == "/tmp"
    assert (
        conninfo(settings={"client_tls_sslmode": mode, "unix_socket_dir": "", **files})["host"] == "127.0.0.1"
    )


def test_libpqs_environment_wins_over_the_settings_parameter_by_parameter() -> None:
    assert conninfo({"PGHOST": "db.internal"}) == {
        "dbname": "pgbouncer", "port": "6432", "user": "postgres", "connect_timeout": str(CONNECT_TIMEOUT_S),
    }  # fmt: skip
    assert "host" not in conninfo({"PGHOSTADDR": "10.1.2.3"})
    assert "port" not in conninfo({"PGPORT": "6543"})
    assert "user" not in conninfo({"PGUSER": "ops"})
    assert "connect_timeout" not in conninfo({"PGCONNECT_TIMEOUT": "3"})
    # A service is read by libpq alone: the settings must not mask what it says.
    assert conninfo({"PGSERVICE": "pooler"}) == {
        "dbname": "pgbouncer",
        "connect_timeout": str(CONNECT_TIMEOUT_S),
    }
    # What only libpq decides is never written into the conninfo (it reads PGPASSWORD itself).
    assert "password" not in conninfo({"PGPASSWORD": "secret", "PGSSLMODE": "require"})


def test_the_command_line_wins_over_everything() -> None:
    environ = {"PGHOST": "db.internal", "PGPORT": "5432", "PGUSER": "app"}
    got = conninfo(environ, dsn="host=10.0.0.7 sslmode=require connect_timeout=2", port=6000, user="ops")
    assert got == {
        "dbname": "pgbouncer", "host": "10.0.0.7", "port": "6000", "user": "ops", "sslmode": "require",
        "connect_timeout": "2",
    }  # fmt: skip
    assert conninfo(dsn="postgresql://ops@pooler:7000/pypooler")["dbname"] == "pypooler"  # the alias
    assert conninfo(dsn="postgresql://ops@pooler:7000", host="/run/pypooler")["host"] == "/run/pypooler"
    assert conninfo(dsn="service=pooler") == {
        "dbname": "pgbouncer", "service": "pooler", "connect_timeout": str(CONNECT_TIMEOUT_S),
    }  # fmt: skip


def test_a_dsn_for_another_database_or_one_libpq_cannot_parse_is_refused() -> None:
    with pytest.raises(ConsoleError, match="--dsn names database 'app': the console is 'pgbouncer'"):
        conninfo(dsn="postgresql://pooler:6432/app")
    with pytest.raises(ConsoleError, match=r"^--dsn: "):
        conninfo(dsn="host=pooler port")


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (
            'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
            "\tIs the server running on that host and accepting TCP/IP connections?",
            'connection to server at "127.0.0.1", port 1 failed: Connection refused;'
            " Is the server running on that host and accepting TCP/IP connections?",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 6432 failed: FATAL:  SSL connection'
            " is required\nDETAIL:  client_tls_sslmode is require\nHINT:  connect with sslmode=require",
            'connection to server at "127.0.0.1", port 6432 failed: FATAL: SSL connection is required;'
            " DETAIL: client_tls_sslmode is require; HINT: connect with sslmode=require",
        ),
        (  # sslmode=prefer retried without TLS: the first attempt says why
            'connection failed: connection to server at "h", port 1 failed: FATAL:  password authentication'
            ' failed for user "alice"\nconnection to server at "h", port 1 failed: FATAL:  SSL connection'
            " is required",
            'connection to server at "h", port 1 failed: FATAL: password authentication failed for'
            ' user "alice" (the password comes from PGPASSWORD or .pgpass/PGPASSFILE; the console'
            " checks auth_file)",
        ),
        (
            'connection is bad: connection to server on socket "/tmp/.s.PGSQL.6432" failed: fe_sendauth:'
            " no password supplied",
            'connection to server on socket "/tmp/.s.PGSQL.6432" failed: fe_sendauth: no password supplied'
            " (the password comes from PGPASSWORD or .pgpass/PGPASSFILE; the console checks auth_file)",
        ),
    ],
)
def test_libpqs_error_becomes_one_line(message: str, line: str) -> None:
    assert one_line(message) == line
