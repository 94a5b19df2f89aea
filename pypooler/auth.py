"""Who may connect, and with which secret.

- `load_auth_file` reads PgBouncer's userlist.txt format: `"user" "secret"` per line, `""` for a
  quote inside a field, lines starting with `;` or `#` are comments.
- `load_hba` reads pg_hba.conf-style rules (`host`, `hostssl`, `hostnossl` for TCP clients,
  `local` for the unix-domain socket's; database and user
  lists with `all` / `sameuser`; an address as CIDR, address + mask, or `all`; methods trust,
  reject, password/plain, md5, scram-sha-256, cert). First match wins; no match rejects.
- `Authenticator` is shared by every client: it picks the method for a connection, finds the
  user's secret (auth_file first, then auth_query through a pooled server connection, answers kept
  `auth_cache_seconds` and concurrent lookups of one user merged into one query) and starts a
  `ClientAuthExchange`.
- `ClientAuthExchange` is one client's login as a sans-IO state machine: `start()` returns the first
  Authentication request, `receive(type, body)` turns each client message into the bytes to send
  back, until `done`. Failures raise the `PoolerError` to send.

Rules kept here:
- An unknown user, a user without a usable secret and a wrong password are one outcome: the same
  exchange runs against a mock secret of the kind most users have (so even the md5 -> SCRAM
  upgrade does not tell them apart), then the same FATAL 28P01. The log says which it was.
- What a successful login teaches (the cleartext password, or the SCRAM ClientKey) is kept in the
  outcome so the pool can log in to PostgreSQL as that user without a stored plain password.
- Nothing here runs per query: this module is off the forwarding path entirely.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from pypooler.config import AuthType, ConfigError, DatabaseConfig, Settings
from pypooler.log_limits import LogLimiter
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import AuthRejected, PasswordAuthFailed, ProtocolViolation
from pypooler.protocol.scram import (
    Md5Hash,
    PlainPassword,
    ScramProofMismatch,
    ScramServerExchange,
    ScramVerifier,
    Secret,
    derived_keys,
    md5_hash,
    md5_response,
    mock_verifier,
    parse_secret,
)
from pypooler.tls import peer_common_name

log = logging.getLogger("pypooler.auth")

__all__ = [
    "Authenticator",
    "ClientAuthExchange",
    "HbaRule",
    "load_auth_file",
    "load_hba",
]

MD5_SALT_BYTES: Final = 4
# Bounds on the caches, so a flood of made-up user names cannot grow memory without limit.
SECRET_CACHE_MAX: Final = 10_000
PLAIN_VERIFIER_CACHE_MAX: Final = 10_000
NS_PER_S: Final = 1_000_000_000

# Methods whose check needs the user's secret.
_PASSWORD_METHODS: Final = frozenset({"plain", "md5", "scram-sha-256"})


# --------------------------------------------------------------------------- auth_file


def _quoted_fields(line: str) -> list[str] | None:
    """The "..." fields of a userlist line ("" inside a field is a quote); None if malformed."""
    fields: list[str] = []
    pos = 0
    while pos < len(line):
        if line[pos].isspace():
            pos += 1
            continue
        if line[pos] != '"':
            return fields if len(fields) >= 2 else None  # the rest of the line is ignored
        pos += 1
        value: list[str] = []
        while True:
            end = line.find('"', pos)
            if end < 0:
                return None
            value.append(line[pos:end])
            if line.startswith('"', end + 1):
                value.append('"')
                pos = end + 2
                continue
            pos = end + 1
            break
        fields.append("".join(value))
    return fields


def load_auth_file(path: str) -> dict[str, Secret]:
    """Read a userlist.txt; ConfigError with one line per bad line."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"auth_file {path}: cannot read ({exc})"]) from None
    secrets_by_user: dict[str, Secret] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        fields = _quoted_fields(line)
        if fields is None or len(fields) < 2:
            problems.append(f'auth_file {path} line {number}: expected "user" "secret"')
            continue
        user, secret_text = fields[0], fields[1]
        try:
            secrets_by_user[user] = parse_secret(secret_text)
        except ValueError as bad:
            problems.append(f"auth_file {path} line {number}: user {user!r}: {bad}")
    if problems:
        raise ConfigError(problems)
    return secrets_by_user


# --------------------------------------------------------------------------- hba

_HBA_CONNECTION_TYPES: Final = frozenset({"local", "host", "hostssl", "hostnossl"})
# pg_hba names -> our method names ("password" is PostgreSQL's word for cleartext).
_HBA_METHODS: Final = {
    "trust": "trust",
    "reject": "reject",
    "password": "plain",
    "plain": "plain",
    "md5": "md5",
    "scram-sha-256": "scram-sha-256",
    "cert": "cert",
    "peer": "peer",
}


@dataclass(frozen=True, slots=True)
class HbaRule:
    line: int
    connection_type: str
    databases: frozenset[str] | None  # None: all
    same_user: bool  # the database list holds "sameuser"
    users: frozenset[str] | None  # None: all
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None  # None: all addresses
    method: str

    def matches(self, *, tls: bool, database: str, user: str, address: str) -> bool:
        kind = self.connection_type
        if (kind == "local") != (address == ""):  # "" is a client on the unix-domain socket
            return False
        if (kind == "hostssl" and not tls) or (kind == "hostnossl" and tls):
            return False
        if (
            self.databases is not None
            and database not in self.databases
            and not (self.same_user and database == user)
        ):
            return False
        if self.users is not None and user not in self.users:
            return False
        if self.network is not None:
            ip = client_ip(address)
            if ip is None or ip.version != self.network.version or ip not in self.network:
                return False
        return True


@functools.lru_cache(maxsize=4096)
def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address as hba lines compare it (an IPv4-mapped IPv6 address as IPv4), or
    None if it is none. Kept: every login (every SQL-over-HTTP request) of a client asks again."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _hba_tokens(line: str) -> list[list[tuple[str, bool]]] | None:
    """Fields of an hba line; each field a comma list of (token, was_quoted). None: bad quoting."""
    fields: list[list[tuple[str, bool]]] = []
    pos = 0
    length = len(line)
    while pos < length:
        if line[pos].isspace():
            pos += 1
            continue
        if line[pos] == "#":
            break
        items: list[tuple[str, bool]] = []
        while True:
            if pos < length and line[pos] == '"':
                end = line.find('"', pos + 1)
                if end < 0:
                    return None
                items.append((line[pos + 1 : end], True))
                pos = end + 1
            else:
                start = pos
                while pos < length and not line[pos].isspace() and line[pos] not in ',"#':
                    pos += 1
                items.append((line[start:pos], False))
            if pos < length and line[pos] == ",":
                pos += 1
                continue
            break
        fields.append(items)
    return fields


def _hba_names(
    items: list[tuple[str, bool]], what: str, keywords: frozenset[str]
) -> tuple[frozenset[str] | None, set[str], str | None]:
    """(names or None for all, keywords seen, problem)."""
    names: set[str] = set()
    seen: set[str] = set()
    for token, quoted in items:
        if not quoted and token in keywords:
            if token == "all":
                return None, seen | {"all"}, None
            seen.add(token)
        elif not quoted and token.startswith(("@", "+")):
            return None, seen, f"{what} {token!r}: @file and +group are not supported"
        elif not quoted and token in ("samerole", "samegroup", "replication"):
            return None, seen, f"{what} {token!r} is not supported"
        elif not token:
            return None, seen, f"empty {what}"
        else:
            names.add(token)
    return frozenset(names), seen, None


def load_hba(path: str) -> list[HbaRule]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"auth_hba_file {path}: cannot read ({exc})"]) from None
    rules: list[HbaRule] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"auth_hba_file {path} line {number}"
        fields = _hba_tokens(raw)
        if fields is None:
            problems.append(f"{where}: unterminated quote")
            continue
        if not fields:
            continue
        rule, problem = _hba_rule(number, fields)
        if problem:
            problems.append(f"{where}: {problem}")
        elif rule is not None:
            rules.append(rule)
    if problems:
        raise ConfigError(problems)
    return rules


def _hba_rule(number: int, fields: list[list[tuple[str, bool]]]) -> tuple[HbaRule | None, str | None]:
    single = [items[0][0] if len(items) == 1 else None for items in fields]
    kind = single[0]
    if kind not in _HBA_CONNECTION_TYPES:
        return None, f"unknown connection type {fields[0][0][0]!r} (host, hostssl, hostnossl, local)"
    address_fields = 0 if kind == "local" else 1
    if len(fields) < 3 + address_fields + 1:
        return None, "too few fields"
    databases, db_keywords, problem = _hba_names(fields[1], "database", frozenset({"all", "sameuser"}))
    if problem:
        return None, problem
    users, _, problem = _hba_names(fields[2], "user", frozenset({"all"}))
    if problem:
        return None, problem
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    rest = 3
    if kind != "local":
        address = single[3]
        if address is None:
            return None, "an address is a single value"
        rest = 4
        if address != "all":
            try:
                if "/" not in address:
                    ipaddress.ip_address(address)
            except ValueError:
                return None, f"invalid address {address!r} (host names are not supported)"
            try:
                if "/" in address:
                    network = ipaddress.ip_network(address, strict=False)
                else:
                    mask = single[4] if len(single) > 5 else None
                    if mask is None:
                        return None, f"address {address!r} needs a /prefix or a mask column"
                    network = ipaddress.ip_network(f"{address}/{mask}", strict=False)
                    rest = 5
            except ValueError:
                return None, f"invalid address {address!r} (host names are not supported)"
    if len(fields) <= rest:
        return None, "no method"
    method_name = single[rest]
    if method_name not in _HBA_METHODS:
        return None, f"unsupported method {fields[rest][0][0]!r} ({', '.join(sorted(_HBA_METHODS))})"
    if len(fields) > rest + 1:
        return None, "options after the method are not supported"
    if method_name == "peer" and kind != "local":
        return None, "peer authentication is only for local (unix-domain socket) lines"
    return (
        HbaRule(
            number, kind, databases, "sameuser" in db_keywords, users, network, _HBA_METHODS[method_name]
        ),
        None,
    )


# --------------------------------------------------------------------------- the exchange


@dataclass(slots=True)
class AuthOutcome:
    """What a successful login taught us, for logging in to the server as the same user."""

    password: str | None = None  # the cleartext (plain method, or a stored plain secret)
    secret: Secret | None = None  # the secret the client was checked against
    client_key: bytes | None = None  # SCRAM pass-through


# A trust login's outcome: it learns nothing (shared; never changed).
TRUSTED: Final = AuthOutcome()


class ClientAuthExchange:
    """One client's authentication. Feed it the client's messages; send what it returns."""

    __slots__ = (
        "_md5_salt",
        "_mock",
        "_scram",
        "_secret",
        "_state",
        "_stored",
        "failure",
        "method",
        "outcome",
        "user",
    )

    def __init__(
        self,
        method: str,
        user: str,
        secret: Secret | None,
        *,
        mock: Callable[[str, bool], Secret],
        channel_binding: bytes | None = None,
        plain_verifier: Callable[[str, str], ScramVerifier] | None = None,
    ) -> None:
        self.user = user
        self.outcome = AuthOutcome()
        self.failure = ""  # why it failed, for the log only
        self._md5_salt = b""
        self._scram: ScramServerExchange | None = None
        self._mock = secret is None
        self._stored = secret  # as stored, before any mock or derived verifier stands in
        if method in ("trust", "cert"):  # no secret is checked: build no stand-in either
            self.method = method
            self._secret = secret or PlainPassword("")  # never compared with anything
            self._state = "start"
            return
        if secret is None:
            self.failure = "no such user or no password"
            secret = mock(user, False)
        # md5 (and a stored verifier) or scram: the exchange is SCRAM.
        if method == "md5" and isinstance(secret, ScramVerifier):
            method = "scram-sha-256"
        if method == "scram-sha-256":
            if isinstance(secret, Md5Hash):
                self.failure = "the stored secret is an MD5 hash, which cannot check SCRAM"
                self._mock = True
                secret = mock(user, True)
            elif isinstance(secret, PlainPassword):
                assert plain_verifier is not None
                secret = plain_verifier(user, secret.password)
            assert isinstance(secret, ScramVerifier)
            self._scram = ScramServerExchange(secret, channel_binding=channel_binding)
        self.method = method
        self._secret = secret
        self._state = "start"

    @property
    def done(self) -> bool:
        return self._state == "done"

    def start(self) -> bytes:
        """The first Authentication request; b"" (and done) when the method asks for nothing."""
        method = self.method
        if method in ("trust", "cert"):
            self._state = "done"
            return b""
        if method == "plain":
            self._state = "password"
            return codec.AUTHENTICATION_CLEARTEXT_PASSWORD
        if method == "md5":
            self._state = "password"
            self._md5_salt = secrets.token_bytes(MD5_SALT_BYTES)
            return codec.build_authentication(c.AUTH_MD5, self._md5_salt)
        assert self._scram is not None
        self._state = "sasl_initial"
        return codec.build_authentication_sasl(self._scram.mechanisms())

    def receive(self, msg_type: int, body: bytes) -> bytes:
        if msg_type != c.F_PASSWORD or self._state in ("start", "done"):
            raise ProtocolViolation(
                f"expected a password response, got message type {chr(msg_type)!r}"
                if 32 < msg_type < 127
                else f"expected a password response, got message type {msg_type}"
            )
        if self._state == "password":
            self._check_password(codec.parse_password_message(body))
            return b""
        scram = self._scram
        assert scram is not None
        if self._state == "sasl_initial":
            mechanism, data = codec.parse_sasl_initial_response(body)
            reply = scram.client_first(mechanism, data)
            self._state = "sasl_response"
            return codec.build_authentication(c.AUTH_SASL_CONTINUE, reply)
        try:
            final = scram.client_final(body)
        except ScramProofMismatch:
            self._fail("wrong password")
        if self._mock:
            self._fail(self.failure)
        stored = self._stored
        self.outcome.secret = stored
        if isinstance(stored, PlainPassword):
            self.outcome.password = stored.password
        else:  # the key fits the stored verifier, not one we derived with our own salt
            self.outcome.client_key = scram.client_key
        self._state = "done"
        return codec.build_authentication(c.AUTH_SASL_FINAL, final)

    def _check_password(self, response: bytes) -> None:
        secret = self._secret
        if self.method == "md5":
            if isinstance(secret, PlainPassword):
                expected = md5_response(md5_hash(secret.password, self.user), self._md5_salt)
            else:
                assert isinstance(secret, Md5Hash)
                expected = md5_response(secret.hashed, self._md5_salt)
            ok = hmac.compare_digest(response, expected)
        else:  # plain: the client sent its cleartext password
            try:
                password = response.decode("utf-8")
            except UnicodeDecodeError:
                password = None
            ok = password is not None and _password_matches(password, secret, self.user)
            if ok:
                self.outcome.password = password
        if not ok:
            self._fail("wrong password")
        if self._mock:
            self._fail(self.failure)
        if isinstance(secret, PlainPassword):
            self.outcome.password = secret.password
        self.outcome.secret = secret
        self._state = "done"

    def _fail(self, why: str) -> NoReturn:
        self._state = "done"
        self.failure = self.failure or why
        raise PasswordAuthFailed.for_user(self.user, self.failure)


def _password_matches(password: str, secret: Secret, user: str) -> bool:
    if isinstance(secret, PlainPassword):
        return hmac.compare_digest(password.encode(), secret.password.encode())
    if isinstance(secret, Md5Hash):
        return hmac.compare_digest(md5_hash(password, user).encode(), secret.hashed.encode())
    client_key, server_key = derived_keys(password, secret.salt, secret.iterations)
    stored_ok = hmac.compare_digest(_sha256(client_key), secret.stored_key)
    return hmac.compare_digest(server_key, secret.server_key) and stored_ok


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --------------------------------------------------------------------------- the authenticator

SecretQuery = Callable[[str, str], Awaitable[str | None]]


class Authenticator:
    """Shared by every client connection: methods, secrets, caches."""

    def __init__(
        self,
        settings: Settings,
        *,
        auth_file: dict[str, Secret] | None = None,
        hba: list[HbaRule] | None = None,
    ) -> None:
        self.settings = settings
        self.auth_file: dict[str, Secret] = auth_file or {}
        self.hba = hba
        # Set by the app: runs auth_query for (database, user) and returns the secret text.
        self.query: SecretQuery | None = None
        self._cache: dict[tuple[str, str], tuple[int, Secret | None]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[Secret | None]] = {}
        self._plain_verifiers: dict[tuple[str, str], ScramVerifier] = {}
        self._mock_key = secrets.token_bytes(32)
        self._mock_kind = self._most_common_kind()
        self.lookups = 0  # auth_query runs, for tests and stats
        self.log_limiter = LogLimiter()  # the pooler's own, once app.Pooler sets it

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Load auth_file and auth_hba_file; ConfigError listing every problem."""
        problems: list[str] = []
        auth_file: dict[str, Secret] = {}
        hba: list[HbaRule] | None = None
        if settings.auth_file:
            try:
                auth_file = load_auth_file(settings.auth_file)
            except ConfigError as exc:
                problems += exc.problems
        if settings.auth_hba_file:
            try:
                hba = load_hba(settings.auth_hba_file)
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(problems)
        return cls(settings, auth_file=auth_file, hba=hba)

    def _most_common_kind(self) -> type[Secret]:
        # The mock for unknown users looks like what most real users have; with auth_query the
        # server's own secrets (SCRAM since PostgreSQL 14's default) are the reference.
        if self.settings.auth_user or not self.auth_file:
            return ScramVerifier
        kinds = Counter(type(secret) for secret in self.auth_file.values())
        return kinds.most_common(1)[0][0]

    # ------------------------------------------------------------------ methods

    def method_for(
        self,
        database: DatabaseConfig | None,
        database_name: str,
        user: str,
        address_of: Callable[[], str],
        *,
        tls: bool,
    ) -> str:
        """The method for this connection; AuthRejected for hba reject / no matching line.
        `address_of()` gives the client's IP address; it is asked only when hba rules apply."""
        auth_type: AuthType = self.settings.auth_type
        if database is not None and database.auth_type is not None:
            auth_type = database.auth_type
        if auth_type != "hba":
            return auth_type
        address = address_of()
        encryption = "SSL encryption" if tls else "no encryption"
        host = address or "[local]"  # as PostgreSQL names a unix-socket client
        for rule in self.hba or ():
            if rule.matches(tls=tls, database=database_name, user=user, address=address):
                if rule.method == "reject":
                    raise AuthRejected(
                        f'pg_hba.conf rejects connection for host "{host}", user "{user}",'
                        f' database "{database_name}", {encryption}'
                    )
                return rule.method
        raise AuthRejected(
            f'no pg_hba.conf entry for host "{host}", user "{user}", database "{database_name}", {encryption}'
        )

    @staticmethod
    def needs_secret(method: str) -> bool:
        return method in _PASSWORD_METHODS

    @staticmethod
    def check_peer(user: str, os_user: str | None) -> None:
        """`peer` method: the operating-system user at the other end of the unix-domain socket
        (SO_PEERCRED) is the database user, as PostgreSQL's peer method without a map."""
        if os_user is None or not hmac.compare_digest(os_user.encode(), user.encode()):
            raise AuthRejected(
                f'Peer authentication failed for user "{user}"',
                detail=f"the connection comes from operating-system user {os_user or '(unknown)'!r}",
            )

    def check_certificate(self, user: str, peercert: object) -> None:
        """`cert` method and verify-full: a verified client certificate whose CN is the user."""
        name = peer_common_name(peercert)
        if name is None:
            raise AuthRejected(
                f'certificate authentication failed for user "{user}"',
                detail="no verified client certificate was presented",
            )
        if not hmac.compare_digest(name.encode(), user.encode()):
            raise AuthRejected(
                f'certificate authentication failed for user "{user}"',
                detail="the certificate's common name does not match the user name",
            )

    # ------------------------------------------------------------------ secrets

    def stored_secret(self, user: str) -> Secret | None:
        """The auth_file secret of `user` (server logins use it too)."""
        return self.auth_file.get(user)

    def cached_secret(self, database: str, user: str) -> tuple[bool, Secret | None]:
        """(known now, secret): from auth_file or a fresh auth_query answer, without waiting."""
        secret = self.auth_file.get(user)
        if secret is not None or not self.settings.auth_user_for(database):
            return True, secret
        cached = self._cache.get((database, user))
        if cached is not None and cached[0] > time.monotonic_ns():
            return True, cached[1]
        return False, None

    async def fetch_secret(self, database: str, user: str) -> Secret | None:
        """Run auth_query (at most one at a time per user) and cache the answer."""
        known, secret = self.cached_secret(database, user)
        if known:  # a lookup ended between the caller's look at the cache and now
            return secret
        key = (database, user)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Secret | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            secret = await self._run_query(database, user)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters re-raise it
            raise
        else:
            future.set_result(secret)
            self._remember(key, secret)
            return secret
        finally:
            del self._inflight[key]

    async def _run_query(self, database: str, user: str) -> Secret | None:
        if self.query is None:
            return None
        self.lookups += 1
        text = await self.query(database, user)
        if not text:
            return None
        try:
            return parse_secret(text)
        except ValueError as exc:
            self.log_limiter.log(
                log, logging.WARNING, ("auth_query_secret", user),
                "auth_query returned an unusable secret for user %r: %s", user, exc,
            )  # fmt: skip
            return None

    def _remember(self, key: tuple[str, str], secret: Secret | None) -> None:
        ttl = self.settings.auth_cache_seconds
        if not ttl:
            return
        now = time.monotonic_ns()
        if len(self._cache) >= SECRET_CACHE_MAX:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= SECRET_CACHE_MAX:
                self._cache.clear()
        self._cache[key] = (now + int(ttl * NS_PER_S), secret)

    def forget(self, database: str, user: str) -> None:
        self._cache.pop((database, user), None)

    # ------------------------------------------------------------------ exchanges

    def exchange(
        self, method: str, user: str, secret: Secret | None, *, channel_binding: bytes | None
    ) -> ClientAuthExchange:
        return ClientAuthExchange(
            method,
            user,
            secret,
            mock=self._mock_secret,
            channel_binding=channel_binding,
            plain_verifier=self._plain_verifier,
        )

    def check_password(self, user: str, secret: Secret | None, password: str) -> AuthOutcome:
        """A login whose client hands over its cleartext password without an exchange (SQL over
        HTTP: the password of the request's connection string), for any password method: the
        `plain` method's check, which fits every kind of secret, the mock for unknown users
        included. PasswordAuthFailed when it does not match."""
        # Each request brings its password again; against a SCRAM verifier the PBKDF2 runs once
        # per (password, salt) all the same: scram.derived_keys keeps what it derived.
        exchange = self.exchange("plain", user, secret, channel_binding=None)
        exchange.start()
        exchange.receive(c.F_PASSWORD, password.encode("utf-8") + b"\0")
        return exchange.outcome

    def _mock_secret(self, user: str, scram: bool) -> Secret:
        """The stand-in secret for a user without one (built only for those logins)."""
        verifier = mock_verifier(user, self._mock_key)
        if scram or self._mock_kind is ScramVerifier:
            return verifier
        if self._mock_kind is Md5Hash:
            return Md5Hash("md5" + verifier.stored_key[:16].hex())
        return PlainPassword(verifier.stored_key.hex())

    def _plain_verifier(self, user: str, password: str) -> ScramVerifier:
        """A SCRAM verifier for a stored plain password, derived once (PBKDF2 is the whole cost
        of a SCRAM login) with a random salt per process and user."""
        key = (user, password)
        verifier = self._plain_verifiers.get(key)
        if verifier is None:
            if len(self._plain_verifiers) >= PLAIN_VERIFIER_CACHE_MAX:
                self._plain_verifiers.clear()
            verifier = ScramVerifier.from_password(password)
            self._plain_verifiers[key] = verifier
        return verifier
