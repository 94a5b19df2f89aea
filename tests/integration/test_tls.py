"""TLS on both sides of pypooler, with a throwaway CA (tests/support/tlscerts.py).

Client side: SSLRequest answered 'S' and the connection upgraded; require refuses plaintext;
verify-full from libpq and asyncpg; SCRAM-SHA-256-PLUS channel binding; client certificates;
hostssl. Server side: a second, module-scoped PostgreSQL with ssl=on, reached with
server_tls_sslmode verify-full (and SCRAM pass-through with channel binding over it).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import codec
from tests.support.pgwire import RawClient, error_fields
from tests.support.tlscerts import CertificateAuthority, make_ca

NO_PASSFILE = "/nonexistent/pypooler-tests/pgpass"
CONNECT_TIMEOUT_S = 10
Runner = Callable[..., Any]


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca: CertificateAuthority = make_ca(directory / "ca")
        self.server_cert, self.server_key = self.ca.issue("server", "localhost", server=True)
        self.postgres_cert, self.postgres_key = self.ca.issue("postgres", "postgres", server=False)
        self.other = make_ca(directory / "other-ca")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_postgres(certs: Certs) -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(
        max_connections=10, ssl_cert_file=certs.server_cert, ssl_key_file=certs.server_key
    ) as pg:
        yield pg


@pytest.fixture
def start_pooler(start_pooler: Runner) -> Iterator[Runner]:
    """The shared factory, plus: nothing may reach the pooler loop's exception handler (a failed
    handshake or login is an error for one client, never an unhandled exception)."""
    errors: list[str] = []

    def start(**overrides: Any) -> Any:
        pooler = start_pooler(**overrides)
        pooler.loop.call_soon_threadsafe(
            pooler.loop.set_exception_handler,
            lambda loop, context: errors.append(str(context.get("message"))),
        )
        return pooler

    yield start
    assert errors == []


def tls_settings(certs: Certs, mode: str = "require", **more: Any) -> dict[str, Any]:
    return {
        "client_tls_sslmode": mode,
        "client_tls_cert_file": certs.server_cert,
        "client_tls_key_file": certs.server_key,
        **more,
    }


def psycopg_login(pooler: Any, user: str = "postgres", password: str | None = None, **params: Any) -> Any:
    params.setdefault("sslmode", "require")
    with psycopg.connect(
        host=params.pop("host", pooler.host), port=pooler.port, dbname="pypooler_test", user=user,
        password=password, passfile=NO_PASSFILE, connect_timeout=CONNECT_TIMEOUT_S,
        prepare_threshold=None, **params,
    ) as conn:  # fmt: skip
        row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        return row[0], conn.pgconn.ssl_in_use


async def test_require_upgrades_and_refuses_plaintext(start_pooler: Runner, certs: Certs) -> None:
    pooler = start_pooler(**tls_settings(certs))

    assert await asyncio.to_thread(psycopg_login, pooler) == ("postgres", True)
    with pytest.raises(psycopg.OperationalError, match="SSL connection is required"):
        await asyncio.to_thread(psycopg_login, pooler, sslmode="disable")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="SSL connection is required"):
        await asyncpg.connect(
            host=pooler.host, port=pooler.port, user="postgres", database="pypooler_test", ssl=False
        )


def console_clients(pooler: Any) -> list[tuple[str, str, str]]:
    """(application_name, tls, transport) of SHOW CLIENTS, asked over TLS with psycopg."""
    with psycopg.connect(
        host=pooler.host, port=pooler.port, dbname="pgbouncer", user="postgres", sslmode="require",
        passfile=NO_PASSFILE, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True,
        application_name="tls-console",
    ) as conn:  # fmt: skip
        cursor = conn.cursor()
        cursor.execute("SHOW CLIENTS")
        names = [column.name for column in cursor.description or []]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    return [(row["application_name"], row["tls"], row["transport"]) for row in rows]


async def test_show_clients_names_the_tls_of_each_client(start_pooler: Runner, certs: Certs) -> None:
    pooler = start_pooler(**tls_settings(certs))
    (console,) = await asyncio.to_thread(console_clients, pooler)
    name, tls, transport = console
    assert name == "tls-console" and transport == "tcp"
    assert tls.startswith("TLSv1.") and "/" in tls  # protocol/cipher, as PgBouncer shows it


async def test_require_exempts_the_unix_socket(start_pooler: Runner, certs: Certs, tmp_path: Path) -> None:
    """As PgBouncer: TLS is required over TCP only (libpq never asks for it on a unix socket)."""
    for mode in ("require", "verify-full"):
        (tmp_path / mode).mkdir()
        more = {"client_tls_ca_file": certs.ca.ca_cert} if mode == "verify-full" else {}
        pooler = start_pooler(**tls_settings(certs, mode, unix_socket_dir=str(tmp_path / mode), **more))
        assert await asyncio.to_thread(
            psycopg_login, pooler, host=str(tmp_path / mode), sslmode="disable"
        ) == ("postgres", False)
        with pytest.raises(psycopg.OperationalError, match="SSL connection is required"):
            await asyncio.to_thread(psycopg_login, pooler, sslmode="disable")


async def test_verify_full_from_libpq_and_asyncpg(start_pooler: Runner, certs: Certs) -> None:
    pooler = start_pooler(**tls_settings(certs))

    for host in ("127.0.0.1", "localhost"):
        assert await asyncio.to_thread(
            psycopg_login, pooler, sslmode="verify-full", sslrootcert=certs.ca.ca_cert, host=host
        ) == ("postgres", True)
    context = ssl.create_default_context(cafile=certs.ca.ca_cert)
    conn = await asyncpg.connect(
        host="localhost", port=pooler.port, user="postgres", database="pypooler_test", ssl=context,
        statement_cache_size=0,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    # A client trusting another CA must refuse pypooler's certificate.
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        await asyncio.to_thread(psycopg_login, pooler, sslmode="verify-full", sslrootcert=certs.other.ca_cert)


async def test_prefer_serves_both(start_pooler: Runner, certs: Certs) -> None:
    pooler = start_pooler(**tls_settings(certs, "prefer"))

    assert await asyncio.to_thread(psycopg_login, pooler, sslmode="prefer") == ("postgres", True)
    assert await asyncio.to_thread(psycopg_login, pooler, sslmode="disable") == ("postgres", False)


async def test_scram_channel_binding(
    start_pooler: Runner, certs: Certs, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    verifier = postgres.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pp_scram'")
    auth_file = tmp_path / "users.txt"
    auth_file.write_text(f'"pp_scram" "{verifier}"\n')
    pooler = start_pooler(**tls_settings(certs, auth_type="scram-sha-256", auth_file=str(auth_file)))

    # libpq insists on SCRAM-SHA-256-PLUS here: it works only if our binding data is right.
    assert await asyncio.to_thread(
        psycopg_login, pooler, "pp_scram", "scrampass", channel_binding="require"
    ) == ("pp_scram", True)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await asyncio.to_thread(psycopg_login, pooler, "pp_scram", "wrong", channel_binding="require")
    # asyncpg does not bind channels: plain SCRAM over TLS must still work for it.
    conn = await asyncpg.connect(
        host=pooler.host, port=pooler.port, user="pp_scram", password="scrampass",
        database="pypooler_test", ssl="require", statement_cache_size=0,
    )  # fmt: skip
    await conn.close()


async def test_client_certificates(start_pooler: Runner, certs: Certs) -> None:
    pooler = start_pooler(**tls_settings(certs, "verify-full", client_tls_ca_file=certs.ca.ca_cert))
    with_cert = {"sslcert": certs.postgres_cert, "sslkey": certs.postgres_key}

    assert await asyncio.to_thread(psycopg_login, pooler, **with_cert) == ("postgres", True)
    # verify-full: the certificate's CN must be the user.
    with pytest.raises(psycopg.OperationalError, match="certificate authentication failed"):
        await asyncio.to_thread(psycopg_login, pooler, "pp_trust", **with_cert)
    # No certificate: the handshake itself fails.
    with pytest.raises(psycopg.OperationalError):
        await asyncio.to_thread(psycopg_login, pooler)


async def test_hostssl_and_cert_method(start_pooler: Runner, certs: Certs, tmp_path: Path) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text("hostssl all postgres 127.0.0.1/32 cert\nhostssl all pp_trust 127.0.0.1/32 trust\n")
    pooler = start_pooler(
        **tls_settings(
            certs, "prefer", client_tls_ca_file=certs.ca.ca_cert, auth_type="hba", auth_hba_file=str(hba)
        )
    )
    with_cert = {"sslcert": certs.postgres_cert, "sslkey": certs.postgres_key}

    assert await asyncio.to_thread(psycopg_login, pooler, **with_cert) == ("postgres", True)
    assert await asyncio.to_thread(psycopg_login, pooler, "pp_trust") == ("pp_trust", True)
    with pytest.raises(psycopg.OperationalError, match="certificate authentication failed"):
        await asyncio.to_thread(psycopg_login, pooler)  # TLS without a certificate
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry .* no encryption"):
        await asyncio.to_thread(psycopg_login, pooler, "pp_trust", sslmode="disable")


async def test_bytes_after_ssl_request_are_refused(start_pooler: Runner, certs: Certs) -> None:
    pooler = start_pooler(**tls_settings(certs))
    client = await RawClient.connect(pooler.host, pooler.port)
    # SSLRequest and a StartupMessage in one write: the second would be injected into TLS.
    client.send(
        codec.build_ssl_request()
        + codec.build_startup_message({"user": "postgres", "database": "pypooler_test"})
    )

    fields = error_fields(await client.until_ready())
    await client.close()

    assert fields is not None and fields["C"] == "08P01"
    assert "unencrypted data after SSL request" in fields["M"]


# --- server side --------------------------------------------------------------------------


def tls_database(pg: EmbeddedPostgres, **more: Any) -> dict[str, Any]:
    return {"databases": {"pypooler_test": {"host": pg.host, "port": pg.port, **more}}}


async def test_server_tls_verify_full(
    start_pooler: Runner, certs: Certs, tls_postgres: EmbeddedPostgres
) -> None:
    pooler = start_pooler(
        server_tls_sslmode="verify-full", server_tls_ca_file=certs.ca.ca_cert, **tls_database(tls_postgres)
    )
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await conn.close()


async def test_server_tls_scram_pass_through_with_channel_binding(
    start_pooler: Runner,
    certs: Certs,
    tls_postgres: EmbeddedPostgres,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pypooler.server")
    verifier = tls_postgres.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pp_scram'")
    auth_file = tmp_path / "users.txt"
    auth_file.write_text(f'"pp_scram" "{verifier}"\n')
    pooler = start_pooler(
        server_tls_sslmode="require",
        auth_type="scram-sha-256",
        auth_file=str(auth_file),
        **tls_database(tls_postgres),
    )
    conn = await asyncpg.connect(
        host=pooler.host, port=pooler.port, user="pp_scram", password="scrampass",
        database="pypooler_test", ssl=False, statement_cache_size=0,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await conn.close()
    assert "SCRAM-SHA-256-PLUS login as 'pp_scram' by pass-through" in caplog.text


async def test_server_tls_failures_are_clear(
    start_pooler: Runner, certs: Certs, tls_postgres: EmbeddedPostgres, postgres: EmbeddedPostgres
) -> None:
    plain_server = start_pooler(server_tls_sslmode="require")  # the session cluster has no TLS
    with pytest.raises(asyncpg.PostgresError, match="does not support SSL"):
        await asyncpg.connect(plain_server.dsn(), statement_cache_size=0)

    wrong_ca = start_pooler(
        server_tls_sslmode="verify-ca", server_tls_ca_file=certs.other.ca_cert, **tls_database(tls_postgres)
    )
    with pytest.raises(asyncpg.PostgresError, match="certificate verify failed"):
        await asyncpg.connect(wrong_ca.dsn(), statement_cache_size=0)
