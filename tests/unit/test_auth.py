"""auth.py without sockets: auth_file and hba parsing, hba matching, the client exchange for every
method x secret kind, no user enumeration, and the auth_query cache."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypooler.auth import Authenticator, ClientAuthExchange, load_auth_file, load_hba
from pypooler.config import ConfigError, DatabaseConfig, Settings, load_settings
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import AuthRejected, PasswordAuthFailed, PoolerError
from pypooler.protocol.scram import (
    MECHANISM,
    Md5Hash,
    PlainPassword,
    ScramClientExchange,
    ScramVerifier,
    Secret,
    md5_hash,
    md5_response,
)

USER = "alice"
PASSWORD = "s3cret"
VERIFIER = ScramVerifier.from_password(PASSWORD)
SECRETS: dict[str, Secret] = {
    "plain": PlainPassword(PASSWORD),
    "md5": Md5Hash(md5_hash(PASSWORD, USER)),
    "scram": VERIFIER,
}


def make_settings(**overrides: Any) -> Settings:  # settings values, as load_settings takes them
    return load_settings(None, env={}, **overrides)


def authenticator(**overrides: object) -> Authenticator:
    return Authenticator(make_settings(**overrides), auth_file={USER: VERIFIER})


# --- auth_file -------------------------------------------------------------------------------


def test_auth_file_formats(tmp_path: Path) -> None:
    path = tmp_path / "userlist.txt"
    path.write_text(
        "; a comment\n# another\n\n"
        '"alice" "s3cret"\n'
        '"bob" "md5' + "0" * 32 + '" extra fields are ignored\n'
        f'"carol" "{VERIFIER}"\n'
        '"quote""d" "pa""ss"\n'
    )

    users = load_auth_file(str(path))

    assert users == {
        "alice": PlainPassword("s3cret"),
        "bob": Md5Hash("md5" + "0" * 32),
        "carol": VERIFIER,
        'quote"d': PlainPassword('pa"ss'),
    }


def test_auth_file_problems_name_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "userlist.txt"
    path.write_text('"ok" "x"\nalice s3cret\n"bob" "SCRAM-SHA-256$broken"\n"unterminated\n')

    with pytest.raises(ConfigError) as excinfo:
        load_auth_file(str(path))

    problems = excinfo.value.problems
    assert len(problems) == 3
    assert "line 2" in problems[0] and "line 3" in problems[1] and "line 4" in problems[2]
    assert "SCRAM" in problems[1]


# --- hba -------------------------------------------------------------------------------------


HBA = """\
# type  database        user        address          method
hostssl all             carol       0.0.0.0/0        cert
host    all             mallory     all              reject
host    sameuser        all         127.0.0.1/32     trust
host    app,"all"       alice,bob   10.0.0.0 255.0.0.0 md5
hostnossl all           all         ::1/128          password
host    all             all         127.0.0.0/8      scram-sha-256
local   all             all                          trust
"""


@pytest.fixture
def hba_rules(tmp_path: Path) -> Authenticator:
    path = tmp_path / "hba.conf"
    path.write_text(HBA)
    settings = make_settings(auth_type="hba", auth_hba_file=str(path), auth_file=str(path))
    return Authenticator(settings, hba=load_hba(str(path)))


@pytest.mark.parametrize(
    ("database", "user", "address", "tls", "method"),
    [
        ("app", "carol", "192.0.2.1", True, "cert"),
        ("alice", "alice", "127.0.0.1", False, "trust"),  # sameuser
        ("app", "alice", "10.1.2.3", False, "md5"),
        ("all", "bob", "10.1.2.3", False, "md5"),  # "all" quoted is a database name
        ("other", "bob", "127.0.0.5", False, "scram-sha-256"),
        ("other", "bob", "::1", False, "plain"),
        ("app", "carol", "127.0.0.1", False, "scram-sha-256"),  # hostssl needs TLS
        ("app", "bob", "::ffff:127.0.0.1", False, "scram-sha-256"),  # v4-mapped
    ],
)
def test_hba_first_match_wins(
    hba_rules: Authenticator, database: str, user: str, address: str, tls: bool, method: str
) -> None:
    assert hba_rules.method_for(None, database, user, lambda: address, tls=tls) == method


def test_hba_reject_and_no_match_say_why(hba_rules: Authenticator) -> None:
    with pytest.raises(AuthRejected, match=r'rejects connection for host "127.0.0.1", user "mallory"'):
        hba_rules.method_for(None, "app", "mallory", lambda: "127.0.0.1", tls=False)
    with pytest.raises(AuthRejected, match=r'no pg_hba.conf entry for host "192.0.2.9".*SSL encryption'):
        hba_rules.method_for(None, "app", "bob", lambda: "192.0.2.9", tls=True)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("hostgssenc all all all md5", "unknown connection type"),
        ("host all all 127.0.0.1 md5", "mask"),
        ("host all all example.com md5", "host names"),
        ("host all all all ident", "unsupported method"),
        ("host all +admins all md5", "+group"),
        ("host all all all md5 clientcert=verify-full", "options"),
        ('host "all all all md5', "quote"),
        ("host all all", "too few"),
    ],
)
def test_hba_problems(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "hba.conf"
    path.write_text(f"# ok\nhost all all all trust\n{line}\n")

    with pytest.raises(ConfigError) as excinfo:
        load_hba(str(path))

    assert len(excinfo.value.problems) == 1
    assert "line 3" in excinfo.value.problems[0] and problem in excinfo.value.problems[0]


def test_database_auth_type_overrides_the_listener() -> None:
    auth = authenticator(auth_type="md5", auth_user="postgres")

    def no_address() -> str:
        raise AssertionError("the address is needed only for hba")

    assert auth.method_for(None, "db", USER, no_address, tls=False) == "md5"
    assert auth.method_for(DatabaseConfig(), "db", USER, no_address, tls=False) == "md5"
    assert auth.method_for(DatabaseConfig(auth_type="trust"), "db", USER, no_address, tls=False) == "trust"


# --- the exchange ------------------------------------------------------------------------------


def replies(data: bytes) -> list[tuple[int, bytes]]:
    return codec.MessageReader().feed(data)


def auth_code(data: bytes) -> tuple[int, bytes]:
    [(msg_type, body)] = replies(data)
    assert msg_type == c.B_AUTHENTICATION
    return codec.parse_authentication(body)


def run_exchange(exchange: ClientAuthExchange, password: str, user: str = USER) -> list[int]:
    """Play the client's side of whatever the exchange asks for; return the request codes seen."""
    codes: list[int] = []
    request = exchange.start()
    if exchange.done:
        return codes
    code, payload = auth_code(request)
    codes.append(code)
    if code == c.AUTH_CLEARTEXT:
        exchange.receive(c.F_PASSWORD, password.encode() + b"\0")
    elif code == c.AUTH_MD5:
        exchange.receive(c.F_PASSWORD, md5_response(md5_hash(password, user), payload) + b"\0")
    else:
        assert code == c.AUTH_SASL
        assert codec.parse_sasl_mechanisms(payload) == [MECHANISM]
        client = ScramClientExchange(password=password)
        first = codec.build_sasl_initial_response(MECHANISM, client.client_first())
        code, server_first = auth_code(exchange.receive(c.F_PASSWORD, first[5:]))
        codes.append(code)
        final = exchange.receive(c.F_PASSWORD, client.server_first(server_first))
        code, server_final = auth_code(final)
        codes.append(code)
        client.server_final(server_final)
    assert exchange.done
    return codes


@pytest.mark.parametrize("secret_kind", ["plain", "md5", "scram"])
@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_every_method_against_every_secret(method: str, secret_kind: str) -> None:
    auth = authenticator(auth_type="md5", auth_user="postgres")
    exchange = auth.exchange(method, USER, SECRETS[secret_kind], channel_binding=None)

    if method == "scram-sha-256" and secret_kind == "md5":
        # An MD5 hash cannot check a SCRAM proof: the client fails like a wrong password.
        with pytest.raises(PasswordAuthFailed) as excinfo:
            run_exchange(exchange, PASSWORD)
        assert excinfo.value.log_detail is not None and "MD5" in excinfo.value.log_detail
        return
    codes = run_exchange(exchange, PASSWORD)

    expected_first = {"plain": c.AUTH_CLEARTEXT, "md5": c.AUTH_MD5, "scram-sha-256": c.AUTH_SASL}[method]
    if method == "md5" and secret_kind == "scram":
        expected_first = c.AUTH_SASL  # md5 upgrades to SCRAM for a SCRAM verifier
    assert codes[0] == expected_first
    outcome = exchange.outcome
    assert outcome.secret == SECRETS[secret_kind]
    if expected_first == c.AUTH_SASL and secret_kind == "scram":
        assert outcome.client_key is not None  # kept for SCRAM pass-through
    if method == "plain" or secret_kind == "plain":
        assert outcome.password == PASSWORD


@pytest.mark.parametrize("secret_kind", ["plain", "md5", "scram"])
@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_wrong_password_fails_with_28p01(method: str, secret_kind: str) -> None:
    auth = authenticator(auth_type="md5", auth_user="postgres")
    exchange = auth.exchange(method, USER, SECRETS[secret_kind], channel_binding=None)

    with pytest.raises(PasswordAuthFailed) as excinfo:
        run_exchange(exchange, "wrong")

    fields = codec.parse_error_fields(replies(excinfo.value.to_error_response())[0][1])
    assert (fields["C"], fields["M"]) == ("28P01", 'password authentication failed for user "alice"')


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_unknown_user_is_indistinguishable_from_wrong_password(method: str) -> None:
    auth = Authenticator(
        make_settings(auth_type="md5", auth_user="postgres"),
        auth_file={"alice": VERIFIER, "bob": ScramVerifier.from_password("x")},
    )
    seen: dict[str, tuple[list[int], dict[str, str]]] = {}
    for user, secret in (("alice", VERIFIER), ("nobody", None)):
        exchange = auth.exchange(method, user, secret, channel_binding=None)
        request = exchange.start()
        with pytest.raises(PasswordAuthFailed) as excinfo:
            run_exchange(auth.exchange(method, user, secret, channel_binding=None), "wrong", user)
        codes: list[int] = [auth_code(request)[0]]
        fields = codec.parse_error_fields(replies(excinfo.value.to_error_response())[0][1])
        fields["M"] = fields["M"].replace(user, "U")
        seen[user] = (codes, fields)
    assert seen["alice"] == seen["nobody"]


def test_unknown_users_salt_is_stable_across_attempts() -> None:
    auth = authenticator(auth_type="scram-sha-256", auth_user="postgres")

    def salt_for(user: str) -> bytes:
        exchange = auth.exchange("scram-sha-256", user, None, channel_binding=None)
        exchange.start()
        client = ScramClientExchange(password="x")
        first = codec.build_sasl_initial_response(MECHANISM, client.client_first())[5:]
        _, server_first = auth_code(exchange.receive(c.F_PASSWORD, first))
        return server_first.split(b",s=")[1].split(b",")[0]

    assert salt_for("ghost") == salt_for("ghost")
    assert salt_for("ghost") != salt_for("phantom")


def test_plain_password_verifier_is_derived_once() -> None:
    auth = authenticator(auth_type="scram-sha-256", auth_user="postgres")
    first = auth.exchange("scram-sha-256", USER, PlainPassword(PASSWORD), channel_binding=None)
    second = auth.exchange("scram-sha-256", USER, PlainPassword(PASSWORD), channel_binding=None)
    run_exchange(first, PASSWORD)
    run_exchange(second, PASSWORD)

    assert auth._plain_verifiers[(USER, PASSWORD)] is auth._plain_verifier(USER, PASSWORD)


@pytest.mark.parametrize("secret_kind", sorted(SECRETS))
def test_a_password_checked_again_and_again(secret_kind: str) -> None:
    """SQL over HTTP brings the password with every request: right every time, a wrong one
    refused every time, and a new secret (an auth_file reload) decides from then on."""
    auth = authenticator()
    secret = SECRETS[secret_kind]
    for _ in range(2):
        assert auth.check_password(USER, secret, PASSWORD).secret == secret
    for _ in range(2):
        with pytest.raises(PasswordAuthFailed):
            auth.check_password(USER, secret, "wrong")
    changed = ScramVerifier.from_password("changed")
    with pytest.raises(PasswordAuthFailed):
        auth.check_password(USER, changed, PASSWORD)
    assert auth.check_password(USER, changed, "changed").secret == changed
    with pytest.raises(PasswordAuthFailed):  # an unknown user: the mock secret, never a match
        auth.check_password("nobody", None, PASSWORD)


def test_trust_and_cert_ask_nothing() -> None:
    auth = authenticator()
    for method in ("trust", "cert"):
        exchange = auth.exchange(method, USER, None, channel_binding=None)
        assert exchange.start() == b""
        assert exchange.done


def test_certificate_common_name_must_be_the_user() -> None:
    auth = authenticator()
    cert = {"subject": ((("countryName", "XX"),), (("commonName", USER),))}

    auth.check_certificate(USER, cert)
    with pytest.raises(AuthRejected, match="certificate authentication failed"):
        auth.check_certificate("bob", cert)
    with pytest.raises(AuthRejected, match="certificate authentication failed"):
        auth.check_certificate(USER, None)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["plain", "md5", "scram-sha-256"]),
    messages=st.lists(
        st.tuples(st.sampled_from([c.F_PASSWORD, c.F_QUERY, 0, 255]), st.binary(max_size=80)),
        max_size=4,
    ),
)
def test_random_client_messages_only_raise_pooler_errors(
    method: str, messages: list[tuple[int, bytes]]
) -> None:
    exchange = authenticator(auth_type="md5", auth_user="postgres").exchange(
        method, USER, VERIFIER, channel_binding=None
    )
    exchange.start()
    try:
        for msg_type, body in messages:
            exchange.receive(msg_type, body)
    except PoolerError:
        return
    assert not exchange.done or exchange.outcome.client_key is None


# --- auth_query cache -----------------------------------------------------------------------


class FakeQuery:
    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers = answers
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, database: str, user: str) -> str | None:
        self.calls += 1
        await self.gate.wait()
        return self.answers.get(user)


async def test_concurrent_lookups_of_one_user_run_one_query() -> None:
    auth = Authenticator(make_settings(auth_user="postgres", auth_cache_seconds=60))
    query = FakeQuery({USER: str(VERIFIER)})
    auth.query = query
    query.gate.clear()

    lookups = [asyncio.create_task(auth.fetch_secret("db", USER)) for _ in range(50)]
    await asyncio.sleep(0)
    query.gate.set()
    results = await asyncio.gather(*lookups)

    assert query.calls == 1
    assert all(result == VERIFIER for result in results)
    assert auth.cached_secret("db", USER) == (True, VERIFIER)


async def test_unknown_users_are_cached_too_and_auth_file_comes_first() -> None:
    auth = Authenticator(
        make_settings(auth_user="postgres", auth_cache_seconds=60), auth_file={"filed": VERIFIER}
    )
    query = FakeQuery({})
    auth.query = query

    assert auth.cached_secret("db", "filed") == (True, VERIFIER)
    assert auth.cached_secret("db", "ghost") == (False, None)
    assert await auth.fetch_secret("db", "ghost") is None
    assert auth.cached_secret("db", "ghost") == (True, None)
    assert query.calls == 1


async def test_cache_seconds_zero_asks_every_time() -> None:
    auth = Authenticator(make_settings(auth_user="postgres", auth_cache_seconds=0))
    query = FakeQuery({USER: "md5" + "1" * 32})
    auth.query = query

    await auth.fetch_secret("db", USER)
    await auth.fetch_secret("db", USER)

    assert query.calls == 2
    assert auth.cached_secret("db", USER) == (False, None)


async def test_lookup_failure_reaches_every_waiter() -> None:
    auth = Authenticator(make_settings(auth_user="postgres"))

    async def broken(database: str, user: str) -> str | None:
        await asyncio.sleep(0)
        raise PasswordAuthFailed("boom")

    auth.query = broken
    results = await asyncio.gather(*(auth.fetch_secret("db", USER) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(result, PasswordAuthFailed) for result in results)
    assert auth.cached_secret("db", USER) == (False, None)
