"""`pypooler advise` as an operator runs it: a process of its own against a `pypooler run`
process, logging in to the console through libpq with what psql would use (SCRAM over TLS, the
unix socket, PGPASSWORD, a .pgpass file), and one line with exit status 2 when it cannot."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol.scram import ScramVerifier
from tests.support.processes import PoolerFactory, free_port
from tests.support.tlscerts import make_ca

PASSWORD = "console-secret"
NO_PASSFILE = "/nonexistent/pypooler-tests/pgpass"
TIMEOUT_S = 60


def scram_auth_file(directory: Path) -> str:
    path = directory / "userlist.txt"
    path.write_text(f'"postgres" "{ScramVerifier.from_password(PASSWORD)}"\n')
    return str(path)


def advise(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """`pypooler advise ARGS` with only `environ` from libpq's and pypooler's variables (none of
    the developer's own, no ~/.pgpass unless PGPASSFILE names one)."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("PG", "PYPOOLER_")) or k == "PYPOOLER_PURE"
    }
    return subprocess.run(
        [sys.executable, "-m", "pypooler", "advise", *args],
        env={**clean, "PGPASSFILE": NO_PASSFILE, **environ},
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip


def one_transaction(**params: Any) -> None:
    """A client's transaction through the pooler, so SHOW ADVICE has a pool to report."""
    with psycopg.connect(
        dbname="pypooler_test", user="postgres", password=PASSWORD, passfile=NO_PASSFILE,
        connect_timeout=10, prepare_threshold=None, **params,
    ) as conn:  # fmt: skip
        conn.execute("SELECT 1")


def assert_reports_the_pool(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert "pool pypooler_test/postgres" in result.stdout and "=> " in result.stdout, result.stdout


@pytest.fixture(scope="module")
def tls_pooler(
    tmp_path_factory: pytest.TempPathFactory, postgres: EmbeddedPostgres
) -> Iterator[tuple[Path, int]]:
    """A `pypooler run` whose clients, the console's too, need TLS and SCRAM: (config, port)."""
    directory = tmp_path_factory.mktemp("advise-tls")
    cert, key = make_ca(directory / "ca").issue("server", "localhost", server=True)
    factory = PoolerFactory(directory, postgres)
    try:
        _, config, _, _ = factory(
            auth_type='"scram-sha-256"', auth_file=f'"{scram_auth_file(directory)}"',
            client_tls_sslmode='"require"', client_tls_cert_file=f'"{cert}"', client_tls_key_file=f'"{key}"',
        )  # fmt: skip
        port = int(config.read_text().split("listen_port = ")[1].split()[0])
        one_transaction(host="127.0.0.1", port=port, sslmode="require")
        yield config, port
    finally:
        for process in factory.started:
            process.stop()


def test_scram_over_tls_with_the_password_from_pgpassword_or_pgpass(
    tls_pooler: tuple[Path, int], tmp_path: Path
) -> None:
    config, port = tls_pooler
    # The config says as whom, `--host` that it is TCP (where TLS applies: over its unix socket the
    # pooler requires none, as PgBouncer), libpq the rest.
    tcp = ("--host", "127.0.0.1")
    assert_reports_the_pool(advise("--config", str(config), *tcp, PGSSLMODE="require", PGPASSWORD=PASSWORD))
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:pgbouncer:postgres:{PASSWORD}\n")
    pgpass.chmod(0o600)  # libpq ignores a .pgpass others may read
    assert_reports_the_pool(
        advise("--config", str(config), *tcp, PGSSLMODE="require", PGPASSFILE=str(pgpass))
    )
    # A copy of the file whose certificates and auth_file this user cannot read (here: they are
    # not there): advise needs only where the console is.
    elsewhere = tmp_path / "pypooler.toml"
    elsewhere.write_text(config.read_text().replace(str(config.parent), "/nonexistent/pypooler-tests"))
    assert_reports_the_pool(
        advise("--config", str(elsewhere), *tcp, PGSSLMODE="require", PGPASSWORD=PASSWORD)
    )
    # Without the config file: the command line and libpq's variables say it all.
    dsn = f"postgresql://postgres@127.0.0.1:{port}/pgbouncer?sslmode=require"
    assert_reports_the_pool(advise("--dsn", dsn, PGPASSFILE=str(pgpass)))


@pytest.mark.parametrize(
    ("why", "args", "environ", "line"),
    [
        ("wrong password", (), {"PGPASSWORD": "wrong"}, 'password authentication failed for user "postgres"'),
        ("no password", (), {}, "no password supplied (the password comes from PGPASSWORD"),
        (
            "no TLS",
            (),
            {"PGSSLMODE": "disable", "PGPASSWORD": PASSWORD},
            "FATAL: SSL connection is required; DETAIL",
        ),
        ("nobody listening", ("--port", "free"), {"PGPASSWORD": PASSWORD}, "failed: Connection refused"),
        ("--password", ("--password", PASSWORD), {}, "--password is no longer accepted"),
    ],
)
def test_what_went_wrong_is_one_line_and_exit_status_2(
    tls_pooler: tuple[Path, int], why: str, args: tuple[str, ...], environ: dict[str, str], line: str
) -> None:
    config, _ = tls_pooler
    args = tuple(str(free_port()) if arg == "free" else arg for arg in args)
    result = advise("--config", str(config), "--host", "127.0.0.1", *args, **environ)
    assert (result.returncode, result.stdout) == (2, ""), why
    assert result.stderr.startswith("pypooler advise: ") and result.stderr.count("\n") == 1, result.stderr
    assert line in result.stderr


def test_the_console_over_the_unix_socket(tmp_path: Path, postgres: EmbeddedPostgres) -> None:
    # TCP is refused: only the unix socket (in tmp_path, beside the config) lets anyone in.
    hba = tmp_path / "hba.conf"
    hba.write_text("local all postgres scram-sha-256\nhost all all all reject\n")
    factory = PoolerFactory(tmp_path, postgres)
    try:
        _, config, _, _ = factory(
            auth_type='"hba"', auth_hba_file=f'"{hba}"', auth_file=f'"{scram_auth_file(tmp_path)}"'
        )
        port = int(config.read_text().split("listen_port = ")[1].split()[0])
        one_transaction(host=str(tmp_path), port=port)
        # The config's unix_socket_dir and listen_port, or libpq's PGHOST (a directory) and PGPORT.
        assert_reports_the_pool(advise("--config", str(config), PGPASSWORD=PASSWORD))
        assert_reports_the_pool(advise(PGHOST=str(tmp_path), PGPORT=str(port), PGPASSWORD=PASSWORD))
        over_tcp = advise("--config", str(config), "--host", "127.0.0.1", PGPASSWORD=PASSWORD)
        assert over_tcp.returncode == 2 and "rejects connection" in over_tcp.stderr, over_tcp.stderr
    finally:
        for process in factory.started:
            process.stop()
