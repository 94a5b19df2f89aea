"""Client authentication and server login through pypooler, against the real test PostgreSQL.

The session cluster's roles log in to PostgreSQL with md5 (pp_md5), scram-sha-256 (pp_scram) and
cleartext (pp_plain, whose stored secret is a SCRAM verifier). Each test writes the auth_file it
needs; SCRAM verifiers and md5 hashes are read from the cluster's pg_authid, so SCRAM pass-through
meets the very verifier PostgreSQL checks.

The matrix: client method x server user x secret source, each driven by psycopg (libpq) and by
asyncpg, and with a wrong password. A cell is "ok", "client" (the client's own login fails with
28P01) or "server" (the client logs in, then pypooler cannot log in to PostgreSQL with what it
knows and says so).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.scram import ScramClientExchange, ScramVerifier, md5_hash
from tests.support.pgwire import RawClient, error_fields

PASSWORDS = {"pp_md5": "md5pass", "pp_scram": "scrampass", "pp_plain": "plainpass"}
NO_PASSFILE = "/nonexistent/pypooler-tests/pgpass"
CONNECT_TIMEOUT_S = 10
SOURCES = ("plain", "md5", "scram", "auth_query")

# Rows: server user; columns: SOURCES. See the module docstring.
EXPECTED = {
    "plain": {
        "pp_md5": ("ok", "ok", "ok", "ok"),
        "pp_scram": ("ok", "ok", "ok", "ok"),
        "pp_plain": ("ok", "ok", "ok", "ok"),
    },
    "md5": {
        "pp_md5": ("ok", "ok", "server", "ok"),  # our own verifier: md5 upgrades to SCRAM
        "pp_scram": ("ok", "server", "ok", "ok"),
        "pp_plain": ("ok", "server", "server", "server"),
    },
    "scram-sha-256": {
        "pp_md5": ("ok", "client", "server", "client"),
        "pp_scram": ("ok", "client", "ok", "ok"),
        "pp_plain": ("ok", "client", "server", "server"),
    },
}

Runner = Callable[..., Any]


@pytest.fixture(scope="module")
def stored(postgres: EmbeddedPostgres) -> dict[str, str]:
    """rolpassword of the password roles, as PostgreSQL keeps them."""
    rows = postgres.psql(
        "SELECT rolname || ' ' || rolpassword FROM pg_authid"
        " WHERE rolname IN ('pp_md5', 'pp_scram', 'pp_plain')"
    )
    return dict(line.split(" ", 1) for line in rows.splitlines())


def write_auth_file(directory: Path, entries: dict[str, str]) -> str:
    path = directory / f"userlist-{uuid.uuid4().hex[:8]}.txt"
    path.write_text("".join(f'"{user}" "{secret}"\n' for user, secret in entries.items()))
    return str(path)


def source_settings(source: str, stored: dict[str, str], directory: Path) -> dict[str, Any]:
    if source == "auth_query":
        return {"auth_user": "postgres"}
    if source == "plain":
        entries = dict(PASSWORDS)
    elif source == "md5":
        entries = {user: md5_hash(password, user) for user, password in PASSWORDS.items()}
    else:
        # pp_md5 has no verifier on the server: give it one of our own making.
        entries = {
            "pp_md5": str(ScramVerifier.from_password(PASSWORDS["pp_md5"])),
            "pp_scram": stored["pp_scram"],
            "pp_plain": stored["pp_plain"],
        }
    return {"auth_file": write_auth_file(directory, entries)}


def psycopg_login(pooler: Any, user: str, password: str, **kwargs: Any) -> str:
    with psycopg.connect(
        host=pooler.host, port=pooler.port, dbname="pypooler_test", user=user, password=password,
        sslmode=kwargs.pop("sslmode", "disable"), passfile=NO_PASSFILE,
        connect_timeout=CONNECT_TIMEOUT_S, prepare_threshold=None, **kwargs,
    ) as conn:  # fmt: skip
        row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        return str(row[0])


async def asyncpg_login(pooler: Any, user: str, password: str) -> str:
    conn = await asyncpg.connect(
        host=pooler.host, port=pooler.port, database="pypooler_test", user=user, password=password,
        ssl=False, statement_cache_size=0, timeout=CONNECT_TIMEOUT_S,
    )  # fmt: skip
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


def assert_outcome(outcome: str, user: str, error: BaseException | None, result: str | None) -> None:
    if outcome == "ok":
        assert error is None, f"{user}: {error}"
        assert result == user
        return
    assert error is not None, f"{user}: expected a {outcome} failure"
    if outcome == "client":
        assert f'password authentication failed for user "{user}"' in str(error)
    else:
        assert "pypooler knows only" in str(error), str(error)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("method", list(EXPECTED))
async def test_auth_matrix(
    start_pooler: Runner, stored: dict[str, str], tmp_path: Path, method: str, source: str
) -> None:
    pooler = start_pooler(pool_size=2, auth_type=method, **source_settings(source, stored, tmp_path))
    for user, outcomes in EXPECTED[method].items():
        outcome = outcomes[SOURCES.index(source)]
        password = PASSWORDS[user]

        result: str | None = None
        error: BaseException | None = None
        try:
            result = await asyncpg_login(pooler, user, password)
        except (asyncpg.PostgresError, OSError) as exc:
            error = exc
        assert_outcome(outcome, user, error, result)

        result, error = None, None
        try:
            result = await asyncio.to_thread(psycopg_login, pooler, user, password)
        except psycopg.OperationalError as exc:
            error = exc
        assert_outcome(outcome, user, error, result)

        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await asyncio.to_thread(psycopg_login, pooler, user, "wrong-" + password)


async def test_unknown_user_and_wrong_password_get_the_same_error(
    start_pooler: Runner, stored: dict[str, str], tmp_path: Path
) -> None:
    pooler = start_pooler(
        auth_type="scram-sha-256", auth_file=write_auth_file(tmp_path, {"pp_scram": stored["pp_scram"]})
    )
    seen = []
    for user in ("pp_scram", "no_such_user"):
        client = await RawClient.connect(pooler.host, pooler.port)
        client.send(codec.build_startup_message({"user": user, "database": "pypooler_test"}))
        msg_type, body = await client.next_message()
        code, _ = codec.parse_authentication(body)
        # Answer with a made-up SCRAM exchange: the proof is wrong either way.
        client.send(codec.build_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=clientnonce"))
        _, body = await client.next_message()
        _, server_first = codec.parse_authentication(body)
        nonce = server_first.split(b",")[0][2:]
        client.send(codec.build_sasl_response(b"c=biws,r=" + nonce + b",p=" + b"A" * 43 + b"="))
        fields = error_fields(await client.until_ready())
        await client.close()
        assert fields is not None
        seen.append((msg_type, code, fields["S"], fields["C"], fields["M"].replace(user, "U")))
    assert seen[0] == seen[1] == (
        c.B_AUTHENTICATION, c.AUTH_SASL, "FATAL", "28P01", 'password authentication failed for user "U"',
    )  # fmt: skip


async def test_scram_pass_through_survives_server_recycling(
    start_pooler: Runner, stored: dict[str, str], tmp_path: Path, postgres: EmbeddedPostgres
) -> None:
    # The pool's servers are killed between transactions, so each one logs in anew with the
    # ClientKey kept from the first client's SCRAM proof (no plain password is known).
    pooler = start_pooler(
        pool_size=1,
        auth_type="scram-sha-256",
        auth_file=write_auth_file(tmp_path, {"pp_scram": stored["pp_scram"]}),
    )
    conn = await asyncpg.connect(
        host=pooler.host, port=pooler.port, database="pypooler_test", user="pp_scram",
        password="scrampass", ssl=False, statement_cache_size=0,
    )  # fmt: skip
    try:
        pids = set()
        for _ in range(3):
            pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            await asyncio.to_thread(postgres.terminate_backends, user="pp_scram")
            for _ in range(100):  # until the pool has seen its idle server die
                if pooler.server_count(user="pp_scram") == 0:
                    break
                await asyncio.sleep(0.01)
        assert len(pids) == 3  # three server logins, all by pass-through
    finally:
        await conn.close()
    # A new client after all that still gets in, with psql this time.
    result = subprocess.run(
        [postgres.bin("psql"), "-X", "-w", "-A", "-t", "-h", pooler.host, "-p", str(pooler.port),
         "-U", "pp_scram", "-d", "pypooler_test", "-c", "SELECT current_user"],
        env={**postgres.env("pp_scram"), "PGPASSFILE": NO_PASSFILE}, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert (result.returncode, result.stdout.strip()) == (0, "pp_scram"), result.stderr


async def test_forced_user_logs_in_with_its_auth_file_password(start_pooler: Runner, tmp_path: Path) -> None:
    pooler = start_pooler(
        user="pp_md5",
        auth_type="md5",
        auth_file=write_auth_file(tmp_path, {"pp_md5": "md5pass", "alice": "alicepass"}),
    )

    assert await asyncpg_login(pooler, "alice", "alicepass") == "pp_md5"


async def test_server_login_with_only_a_verifier_and_no_client_key_says_so(
    start_pooler: Runner, stored: dict[str, str], tmp_path: Path
) -> None:
    pooler = start_pooler(
        user="pp_scram",
        auth_file=write_auth_file(tmp_path, {"pp_scram": stored["pp_scram"]}),
    )  # auth_type trust: no client ever proves the SCRAM key

    with pytest.raises(asyncpg.PostgresError, match="no client has logged in with SCRAM yet"):
        await asyncpg_login(pooler, "postgres", "")


async def test_unsupported_server_method_is_named(start_pooler: Runner) -> None:
    async def gss_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(codec.build_authentication(7))  # AuthenticationGSS
        await writer.drain()
        await reader.read(1024)
        writer.close()

    fake = await asyncio.start_server(gss_only, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    try:
        pooler = start_pooler(
            server_tls_sslmode="disable",
            databases={"gss": {"host": "127.0.0.1", "port": port}},
        )
        client = await RawClient.connect(pooler.host, pooler.port)
        client.send(codec.build_startup_message({"user": "u", "database": "gss"}))
        fields = error_fields(await client.until_ready())
        await client.close()
    finally:
        fake.close()
        await fake.wait_closed()
    assert fields is not None
    assert "GSSAPI" in fields["M"] and "does not support" in fields["M"]


async def test_auth_query_burst_runs_one_lookup(start_pooler: Runner) -> None:
    pooler = start_pooler(pool_size=3, auth_type="scram-sha-256", auth_user="postgres", auth_cache_seconds=30)

    users = await asyncio.gather(*(asyncpg_login(pooler, "pp_scram", "scrampass") for _ in range(20)))

    assert users == ["pp_scram"] * 20
    assert pooler.call(lambda: pooler.pooler.auth.lookups) == 1


async def test_auth_user_per_database(start_pooler: Runner, postgres: EmbeddedPostgres) -> None:
    target = {"host": postgres.host, "port": postgres.port}
    pooler = start_pooler(
        auth_type="scram-sha-256",
        databases={"pypooler_test": {**target, "auth_user": "postgres"}, "postgres": target},
    )
    assert await asyncpg_login(pooler, "pp_scram", "scrampass") == "pp_scram"  # auth_query here
    with pytest.raises(asyncpg.InvalidPasswordError):  # no auth_user, no auth_file: unknown
        await asyncpg.connect(
            host=pooler.host, port=pooler.port, user="pp_scram", password="scrampass", database="postgres"
        )


async def test_auth_query_respects_valid_until(start_pooler: Runner, postgres: EmbeddedPostgres) -> None:
    role = f"pp_expiring_{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(
        postgres.psql,
        f"SET password_encryption = 'scram-sha-256';"
        f" CREATE ROLE {role} LOGIN PASSWORD 'exp' VALID UNTIL '2000-01-01';"
        f" GRANT ALL ON DATABASE pypooler_test TO {role};",
    )
    pooler = start_pooler(auth_type="scram-sha-256", auth_user="postgres", auth_cache_seconds=0)

    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg_login(pooler, role, "exp")
    await asyncio.to_thread(postgres.psql, f"ALTER ROLE {role} VALID UNTIL 'infinity'")
    assert await asyncpg_login(pooler, role, "exp") == role


async def test_hba_file(start_pooler: Runner, stored: dict[str, str], tmp_path: Path) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text(
        "host all pp_md5 127.0.0.1/32 reject\n"
        "hostssl all all all md5\n"
        "host all pp_scram 127.0.0.1/32 scram-sha-256\n"
        "host all postgres 127.0.0.1/32 trust\n"
    )
    pooler = start_pooler(
        auth_type="hba",
        auth_hba_file=str(hba),
        auth_file=write_auth_file(tmp_path, {"pp_scram": stored["pp_scram"]}),
    )

    assert await asyncpg_login(pooler, "pp_scram", "scrampass") == "pp_scram"
    assert await asyncpg_login(pooler, "postgres", "") == "postgres"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="rejects connection"):
        await asyncpg_login(pooler, "pp_md5", "md5pass")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match=r"no pg_hba\.conf entry"):
        await asyncpg_login(pooler, "pp_plain", "plainpass")


async def test_client_login_timeout_closes_slow_logins_only(
    start_pooler: Runner, stored: dict[str, str], tmp_path: Path
) -> None:
    pooler = start_pooler(
        client_login_timeout=0.3,
        auth_type="scram-sha-256",
        auth_file=write_auth_file(tmp_path, {"pp_scram": stored["pp_scram"]}),
    )
    silent = await RawClient.connect(pooler.host, pooler.port)  # never sends a byte
    stalled = await RawClient.connect(pooler.host, pooler.port)  # stops in the middle of SCRAM
    stalled.send(codec.build_startup_message({"user": "pp_scram", "database": "pypooler_test"}))
    assert (await stalled.next_message())[0] == c.B_AUTHENTICATION

    # Meanwhile a well-behaved client logs in and works.
    assert await asyncpg_login(pooler, "pp_scram", "scrampass") == "pp_scram"

    fields = error_fields(await stalled.until_ready(timeout=5))
    assert fields is not None and fields["C"] == "57014" and "client_login_timeout" in fields["M"]
    messages = await silent.until_ready(timeout=5)  # an error, then EOF
    assert error_fields(messages) is not None
    await stalled.close()
    await silent.close()
    assert pooler.call(lambda: len(pooler.pooler.registry.logging_in)) == 0


async def test_databases_password_may_be_a_verifier(
    start_pooler: Runner, stored: dict[str, str], tmp_path: Path
) -> None:
    # No plain password anywhere: the server login passes the client's proven key through.
    pooler = start_pooler(
        user="pp_scram",
        password=stored["pp_scram"],
        auth_type="scram-sha-256",
        auth_file=write_auth_file(tmp_path, {"pp_scram": stored["pp_scram"]}),
    )

    assert await asyncpg_login(pooler, "pp_scram", "scrampass") == "pp_scram"


def test_check_config_reports_auth_file_hba_and_certificate_problems(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text('"ok" "x"\nnot quoted\n')
    hba = tmp_path / "hba.conf"
    hba.write_text("host all all all ident\n")
    not_a_cert = tmp_path / "cert.pem"
    not_a_cert.write_text("nonsense\n")
    config = tmp_path / "pypooler.toml"
    config.write_text(
        f'auth_type = "hba"\nauth_file = "{users}"\nauth_hba_file = "{hba}"\n'
        f'client_tls_sslmode = "require"\nclient_tls_cert_file = "{not_a_cert}"\n'
        f'client_tls_key_file = "{not_a_cert}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "pypooler", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if "config error" in line]
    assert len(problems) == 3, result.stderr
    assert "auth_file" in problems[0] and "line 2" in problems[0]
    assert "auth_hba_file" in problems[1] and "ident" in problems[1]
    assert "client_tls_cert_file" in problems[2]


async def scram_login_raw(pooler: Any, user: str, password: str, database: str) -> RawClient:
    """Log in with SCRAM over a raw connection; AssertionError carrying the error fields."""
    client = await RawClient.connect(pooler.host, pooler.port)
    client.send(codec.build_startup_message({"user": user, "database": database}))
    scram = ScramClientExchange(password=password)
    _, body = await client.next_message()
    assert codec.parse_authentication(body)[0] == c.AUTH_SASL
    client.send(codec.build_sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
    _, body = await client.next_message()
    client.send(codec.build_sasl_response(scram.server_first(codec.parse_authentication(body)[1])))
    messages = await client.until_ready()
    fields = error_fields(messages)
    if fields is not None:
        await client.close()
        raise AssertionError(fields)
    return client


async def test_admin_console_logins_are_authenticated(start_pooler: Runner, tmp_path: Path) -> None:
    pooler = start_pooler(
        auth_type="scram-sha-256", auth_file=write_auth_file(tmp_path, {"postgres": "adminpass"})
    )

    with pytest.raises(AssertionError, match="28P01"):
        await scram_login_raw(pooler, "postgres", "wrong", "pgbouncer")
    console = await scram_login_raw(pooler, "postgres", "adminpass", "pgbouncer")
    try:
        assert error_fields(await console.query("SHOW POOLS")) is None
    finally:
        await console.close()
    assert pooler.call(lambda: len(pooler.pooler.registry.logging_in)) == 0


async def test_reload_rereads_auth_file_and_keeps_it_when_broken(
    start_pooler: Runner, stored: dict[str, str], tmp_path: Path
) -> None:
    auth_file = Path(write_auth_file(tmp_path, {"pp_scram": stored["pp_scram"]}))
    pooler = start_pooler(auth_type="scram-sha-256", auth_file=str(auth_file))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg_login(pooler, "pp_plain", "plainpass")

    auth_file.write_text(f'"pp_scram" "{stored["pp_scram"]}"\n"pp_plain" "plainpass"\n')
    assert pooler.call(lambda: pooler.pooler.reload(pooler.settings)) is True
    assert await asyncpg_login(pooler, "pp_plain", "plainpass") == "pp_plain"

    auth_file.write_text('"pp_plain" "SCRAM-SHA-256$broken"\n')
    assert pooler.call(lambda: pooler.pooler.reload(pooler.settings)) is False
    assert await asyncpg_login(pooler, "pp_plain", "plainpass") == "pp_plain"  # old file kept


async def test_a_stale_auth_file_verifier_is_named_with_its_hint(
    start_pooler: Runner, postgres: EmbeddedPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # auth_file was written, then the role's password changed on the server: the client still
    # proves the old password, so the ClientKey passed through no longer matches the server's
    # StoredKey. On both builds that is one clear error, never a TypeError from the compiled one.
    role = f"pp_stale_{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(
        postgres.psql,
        f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {role} LOGIN PASSWORD 'old';"
        f" GRANT ALL ON DATABASE pypooler_test TO {role};",
    )
    verifier = await asyncio.to_thread(
        postgres.psql, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"
    )
    await asyncio.to_thread(
        postgres.psql, f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD 'new'"
    )
    pooler = start_pooler(
        auth_type="scram-sha-256", auth_file=write_auth_file(tmp_path, {role: verifier.strip()})
    )

    with pytest.raises(asyncpg.PostgresError) as raised:
        await asyncpg_login(pooler, role, "old")

    error: Any = raised.value
    assert f"SCRAM pass-through for user {role!r} cannot work" in error.args[0]
    assert error.hint == "the auth_file verifier must be the one stored in the server's pg_authid"
    assert "TypeError" not in error.args[0] and "object expected" not in error.args[0]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
