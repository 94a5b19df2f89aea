"""Password secrets and the SCRAM-SHA-256 / MD5 exchanges, sans-IO, in both directions.

pypooler stands on both sides of a login: it is the server to its clients (`ScramServerExchange`)
and a client to PostgreSQL (`ScramClientExchange`). Both only turn messages into messages; the
connection objects move the bytes.

Secrets come in PostgreSQL's three spellings (`parse_secret`): a plain password, an MD5 hash
(`md5` + hex of md5(password + user)) and a SCRAM verifier
(`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64 parts).

Rules kept here:
- Every comparison of secret-derived bytes uses `hmac.compare_digest`; nonces come from `secrets`.
- A client whose user is unknown runs the very same exchange against a mock verifier (salt derived
  from the user name and a per-process key, so it is stable across attempts) and fails at the
  same step as a wrong password: no user enumeration by message, salt or step.
- Malformed SCRAM messages raise `ProtocolViolation` (08P01); a wrong proof raises
  `ScramProofMismatch`, which the caller reports as a password failure; a channel-binding
  disagreement raises `ChannelBindingError` (28000).
- PBKDF2 is the only expensive step (4096 HMACs): its result for a given (password, salt,
  iterations) is cached, so neither a stored plain password nor a server login derives it twice.
- SCRAM pass-through: the ClientKey a client proves it holds (ClientProof XOR ClientSignature, with
  H(ClientKey) == StoredKey checked) is kept, so pypooler can log in to a server that stores the
  same verifier without ever knowing the password.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

from scramp.utils import saslprep

from pypooler.protocol.errors import ChannelBindingError, ProtocolViolation

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE: Final = "tls-server-end-point"
# PostgreSQL's default (scram_iterations); RFC 7677 asks for at least 4096.
DEFAULT_ITERATIONS: Final = 4096
SALT_BYTES: Final = 16
NONCE_BYTES: Final = 18  # PostgreSQL's length; base64 makes 24 printable characters
KEY_BYTES: Final = 32  # SHA-256 output
# A verifier asking for more rounds than this is refused: one login must not cost seconds of CPU.
MAX_ITERATIONS: Final = 10_000_000
# Distinct (password, salt, iterations) derivations kept; each entry is about 200 bytes.
DERIVED_KEYS_CACHE: Final = 4096

_VERIFIER_PREFIX: Final = MECHANISM + "$"
_MD5_PREFIX: Final = "md5"
_MD5_HEX_LEN: Final = 32


class ScramProofMismatch(Exception):
    """The client's proof does not match the verifier: a wrong password (or an unknown user)."""


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True, slots=True)
class PlainPassword:
    password: str = ""

    def __repr__(self) -> str:  # never show a password
        return "PlainPassword(***)"


@dataclass(frozen=True, slots=True)
class Md5Hash:
    """`md5` + hex(md5(password + user)): usable only for the md5 exchange of that same user."""

    hashed: str = ""

    def __repr__(self) -> str:
        return "Md5Hash(***)"


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return f"ScramVerifier(iterations={self.iterations}, ***)"

    def __str__(self) -> str:
        return (
            f"{_VERIFIER_PREFIX}{self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse PostgreSQL's verifier text; ValueError naming the broken part."""
        if not text.startswith(_VERIFIER_PREFIX):
            raise ValueError(f"a SCRAM verifier starts with {_VERIFIER_PREFIX!r}")
        try:
            params, keys = text[len(_VERIFIER_PREFIX) :].split("$")
            iterations_text, salt_text = params.split(":")
            stored_text, server_text = keys.split(":")
        except ValueError:
            raise ValueError(
                "a SCRAM verifier looks like SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
            ) from None
        if not iterations_text.isdigit() or not 1 <= int(iterations_text) <= MAX_ITERATIONS:
            raise ValueError(f"SCRAM iteration count must be 1..{MAX_ITERATIONS}")
        salt = _unb64(salt_text, "salt")
        stored_key = _unb64(stored_text, "StoredKey")
        server_key = _unb64(server_text, "ServerKey")
        if not salt:
            raise ValueError("SCRAM salt is empty")
        if len(stored_key) != KEY_BYTES or len(server_key) != KEY_BYTES:
            raise ValueError(f"SCRAM StoredKey and ServerKey must be {KEY_BYTES} bytes")
        return cls(int(iterations_text), salt, stored_key, server_key)

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
        client_key, server_key = derived_keys(password, salt, iterations)
        return cls(iterations, salt, _sha256(client_key), server_key)


Secret = PlainPassword | Md5Hash | ScramVerifier


def parse_secret(text: str) -> Secret:
    """A stored secret in PostgreSQL's spelling; ValueError only for a broken SCRAM verifier.

    Like PostgreSQL, a value that looks exactly like an MD5 hash is one; anything else that is not
    a verifier is a plain password.
    """
    if text.startswith(_VERIFIER_PREFIX):
        return ScramVerifier.parse(text)
    if (
        len(text) == len(_MD5_PREFIX) + _MD5_HEX_LEN
        and text.startswith(_MD5_PREFIX)
        and all(ch in "0123456789abcdef" for ch in text[len(_MD5_PREFIX) :])
    ):
        return Md5Hash(text)
    return PlainPassword(text)


# --------------------------------------------------------------------------- primitives


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"SCRAM {what} is not valid base64") from None


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _xor(left: bytes, right: bytes) -> bytes:
    return (int.from_bytes(left, "big") ^ int.from_bytes(right, "big")).to_bytes(len(left), "big")


def normalize_password(password: str) -> bytes:
    """SASLprep the password as PostgreSQL does: a password SASLprep refuses is used as is."""
    if password.isascii():  # printable ASCII is unchanged by SASLprep; skip the table walk
        return password.encode()
    try:
        prepared = saslprep(password)
    except Exception:  # scramp raises ScramException for prohibited characters
        return password.encode("utf-8", "surrogateescape")
    return (prepared or password).encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=DERIVED_KEYS_CACHE)
def derived_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for a password: PBKDF2 once per (password, salt, iterations)."""
    salted = hashlib.pbkdf2_hmac("sha256", normalize_password(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def md5_hash(password: str, user: str) -> str:
    """The stored form of an MD5 password: `md5` + hex(md5(password + user))."""
    return _MD5_PREFIX + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(hashed: str, salt: bytes) -> bytes:
    """The PasswordMessage payload answering an MD5 challenge, from the stored hash."""
    return _MD5_PREFIX.encode() + hashlib.md5(hashed[len(_MD5_PREFIX) :].encode() + salt).hexdigest().encode()


def mock_verifier(user: str, mock_key: bytes) -> ScramVerifier:
    """A verifier for a user that does not exist: same shape every time, matches no password."""
    digest = _hmac(mock_key, b"salt\0" + user.encode("utf-8", "surrogateescape"))
    return ScramVerifier(
        DEFAULT_ITERATIONS,
        digest[:SALT_BYTES],
        _hmac(mock_key, b"stored\0" + digest),
        _hmac(mock_key, b"server\0" + digest),
    )


# --------------------------------------------------------------------------- messages


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """Split `a=1,b=2` into pairs; every attribute is one letter, '=', a value."""
    pairs: list[tuple[str, str]] = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z"):
            raise ProtocolViolation(f"malformed SCRAM message: bad attribute in {what}")
        pairs.append((part[0], part[2:]))
    return pairs


def _decode_scram(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"malformed SCRAM message: {what} is not UTF-8") from None
    if "\0" in text:
        raise ProtocolViolation(f"malformed SCRAM message: NUL in {what}")
    return text


# RFC 5802 "printable": %x21-2B / %x2D-7E (visible ASCII but the comma).
_PRINTABLE = re.compile(r"[!-+\--~]+")


def _check_nonce(nonce: str) -> None:
    if _PRINTABLE.fullmatch(nonce) is None:
        raise ProtocolViolation("malformed SCRAM message: invalid nonce")


def _proof_bytes(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ProtocolViolation("malformed SCRAM message: proof is not base64") from None
    if len(raw) != KEY_BYTES:
        raise ProtocolViolation("malformed SCRAM message: proof has the wrong length")
    return raw


# --------------------------------------------------------------------------- server side


class ScramServerExchange:
    """One client's SCRAM-SHA-256 login, pypooler acting as the server.

    `channel_binding` is the tls-server-end-point hash of pypooler's certificate when the client
    connection is TLS (then SCRAM-SHA-256-PLUS is offered first), None on a plain connection.
    Call `client_first(mechanism, data)` with the SASLInitialResponse, send back what it returns
    (AuthenticationSASLContinue payload), then `client_final(data)` with the SASLResponse: it returns
    the AuthenticationSASLFinal payload or raises. `client_key` is set once the proof checked out.
    """

    __slots__ = (
        "_channel_binding",
        "_client_first_bare",
        "_gs2_header",
        "_nonce",
        "_server_first",
        "_server_nonce",
        "_verifier",
        "client_key",
    )

    def __init__(
        self,
        verifier: ScramVerifier,
        *,
        channel_binding: bytes | None = None,
        server_nonce: str | None = None,  # fixed only by tests (RFC 7677 vectors)
    ) -> None:
        self._verifier = verifier
        self._channel_binding = channel_binding
        self._server_nonce = server_nonce or _b64(secrets.token_bytes(NONCE_BYTES))
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""
        self.client_key: bytes | None = None

    def mechanisms(self) -> list[str]:
        """What AuthenticationSASL offers, strongest first."""
        return [MECHANISM_PLUS, MECHANISM] if self._channel_binding is not None else [MECHANISM]

    def client_first(self, mechanism: str, data: bytes) -> bytes:
        if mechanism not in self.mechanisms():
            raise ProtocolViolation(
                f"client selected an invalid SASL authentication mechanism: {mechanism!r}"
            )
        text = _decode_scram(data, "client-first-message")
        # gs2-header: cbind flag, authzid, then the bare message.
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ProtocolViolation("malformed SCRAM message: client-first-message too short")
        flag, authzid, bare = parts
        if flag == "n":
            if mechanism == MECHANISM_PLUS:
                raise ProtocolViolation("channel binding is required by SCRAM-SHA-256-PLUS but not used")
        elif flag == "y":
            if mechanism == MECHANISM_PLUS:
                raise ProtocolViolation("channel binding is required by SCRAM-SHA-256-PLUS but not used")
            if self._channel_binding is not None:
                # The client thinks we cannot bind, but we offered PLUS: someone stripped it.
                raise ChannelBindingError(
                    "SCRAM channel binding negotiation error",
                    detail="the client supports SCRAM channel binding but thinks the server does"
                    " not; this server does support it (a downgrade attempt?)",
                )
        elif flag.startswith("p="):
            if mechanism != MECHANISM_PLUS:
                raise ProtocolViolation(
                    "channel binding is requested but SCRAM-SHA-256-PLUS was not selected"
                )
            if flag[2:] != CHANNEL_BINDING_TYPE:
                raise ChannelBindingError(
                    f"unsupported SCRAM channel-binding type {flag[2:]!r}",
                    hint=f"pypooler supports {CHANNEL_BINDING_TYPE}",
                )
        else:
            raise ProtocolViolation("malformed SCRAM message: unexpected channel-binding flag")
        if authzid:
            raise ProtocolViolation("client uses authorization identity, but it is not supported")
        attributes = _attributes(bare, "client-first-message")
        if attributes[0][0] == "m":
            raise ProtocolViolation("client requires an unsupported SCRAM extension")
        # The user name inside SCRAM is ignored, as PostgreSQL does: the startup packet's counts.
        if len(attributes) < 2 or attributes[0][0] != "n" or attributes[1][0] != "r":
            raise ProtocolViolation("malformed SCRAM message: expected n= and r= attributes")
        client_nonce = attributes[1][1]
        _check_nonce(client_nonce)
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        verifier = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(verifier.salt)},i={verifier.iterations}"
        return self._server_first.encode()

    def client_final(self, data: bytes) -> bytes:
        if not self._server_first:
            raise ProtocolViolation("SCRAM client-final-message before client-first-message")
        text = _decode_scram(data, "client-final-message")
        proof_at = text.rfind(",p=")
        if proof_at < 0:
            raise ProtocolViolation("malformed SCRAM message: proof missing")
        without_proof = text[:proof_at]
        attributes = _attributes(without_proof, "client-final-message")
        if len(attributes) < 2 or attributes[0][0] != "c" or attributes[1][0] != "r":
            raise ProtocolViolation("malformed SCRAM message: expected c= and r= attributes")
        proof = _proof_bytes(text[proof_at + 3 :])
        expected_binding = self._gs2_header.encode()
        if self._gs2_header.startswith("p="):
            assert self._channel_binding is not None
            expected_binding += self._channel_binding
        try:
            binding = base64.b64decode(attributes[0][1].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ProtocolViolation("malformed SCRAM message: channel binding is not base64") from None
        if not hmac.compare_digest(binding, expected_binding):
            raise ChannelBindingError("SCRAM channel binding check failed")
        if not hmac.compare_digest(attributes[1][1].encode(), self._nonce.encode()):
            raise ProtocolViolation("SCRAM nonce mismatch in client-final-message")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        verifier = self._verifier
        client_key = _xor(proof, _hmac(verifier.stored_key, auth_message))
        if not hmac.compare_digest(_sha256(client_key), verifier.stored_key):
            raise ScramProofMismatch()
        self.client_key = client_key
        return b"v=" + _b64(_hmac(verifier.server_key, auth_message)).encode()


# --------------------------------------------------------------------------- client side


class ScramClientExchange:
    """pypooler logging in to PostgreSQL with SCRAM-SHA-256.

    Either with a password (keys derived once per server salt, cached), or by pass-through with
    the ClientKey recovered from a client's proof and the ServerKey of the same verifier (then the
    server's salt and iteration count must be the verifier's, or the keys cannot match).
    `channel_binding` is the tls-server-end-point hash of the server's certificate when the
    connection is TLS and the server offered SCRAM-SHA-256-PLUS.
    """

    __slots__ = (
        "_channel_binding",
        "_client_first_bare",
        "_expected_server_signature",
        "_gs2_header",
        "_keys",
        "_nonce",
        "_password",
        "_verifier",
        "server_verified",
    )

    def __init__(
        self,
        *,
        password: str | None = None,
        pass_through: tuple[ScramVerifier, bytes] | None = None,
        channel_binding: bytes | None = None,
        tls: bool = False,
        nonce: str | None = None,  # fixed only by tests (RFC 7677 vectors)
        user: str = "",  # PostgreSQL ignores it; the startup packet names the user
    ) -> None:
        if (password is None) == (pass_through is None):
            raise ValueError("give exactly one of password and pass_through")
        self._password = password
        self._verifier = pass_through[0] if pass_through else None
        self._keys = (pass_through[1], pass_through[0].server_key) if pass_through else None
        self._channel_binding = channel_binding
        if channel_binding is not None:
            self._gs2_header = f"p={CHANNEL_BINDING_TYPE},,"
        else:
            # "y": we could bind but the server did not offer it (only said over TLS).
            self._gs2_header = "y,," if tls else "n,,"
        self._nonce = nonce or _b64(secrets.token_bytes(NONCE_BYTES))
        escaped_user = user.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={escaped_user},r={self._nonce}"
        self._expected_server_signature = b""
        self.server_verified = False  # server_final checked the server's signature

    @property
    def mechanism(self) -> str:
        return MECHANISM_PLUS if self._channel_binding is not None else MECHANISM

    def client_first(self) -> bytes:
        return (self._gs2_header + self._client_first_bare).encode()

    def server_first(self, data: bytes) -> bytes:
        text = _decode_scram(data, "server-first-message")
        attributes = dict(_attributes(text, "server-first-message"))
        if "e" in attributes:
            raise ProtocolViolation(f"server reported SCRAM error: {attributes['e']}")
        nonce, salt_text, iterations_text = attributes.get("r"), attributes.get("s"), attributes.get("i")
        if nonce is None or salt_text is None or iterations_text is None:
            raise ProtocolViolation("malformed SCRAM server-first-message")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ProtocolViolation("SCRAM server nonce does not extend ours")
        _check_nonce(nonce)
        try:
            salt = _unb64(salt_text, "salt")
        except ValueError as exc:
            raise ProtocolViolation(str(exc)) from None
        if not iterations_text.isdigit() or not 1 <= int(iterations_text) <= MAX_ITERATIONS:
            raise ProtocolViolation("SCRAM iteration count out of range")
        iterations = int(iterations_text)
        if self._keys is not None:
            verifier = self._verifier
            assert verifier is not None
            if salt != verifier.salt or iterations != verifier.iterations:
                raise ScramProofMismatch(
                    "the server's SCRAM salt or iteration count differs from the stored verifier"
                )
            client_key, server_key = self._keys
        else:
            assert self._password is not None
            client_key, server_key = derived_keys(self._password, salt, iterations)
        binding = self._gs2_header.encode() + (self._channel_binding or b"")
        without_proof = f"c={_b64(binding)},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message))
        self._expected_server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def server_final(self, data: bytes) -> None:
        """Check the server's signature: it proves the server knows the verifier too."""
        text = _decode_scram(data, "server-final-message")
        attributes = dict(_attributes(text, "server-final-message"))
        if "e" in attributes:
            raise ProtocolViolation(f"server reported SCRAM error: {attributes['e']}")
        try:
            signature = _unb64(attributes.get("v", ""), "server signature")
        except ValueError as exc:
            raise ProtocolViolation(str(exc)) from None
        if not self._expected_server_signature or not hmac.compare_digest(
            signature, self._expected_server_signature
        ):
            raise ProtocolViolation("SCRAM server signature is wrong: the server does not know the password")
        self.server_verified = True


# --------------------------------------------------------------------------- TLS channel binding


def certificate_hash(der: bytes) -> bytes:
    """tls-server-end-point channel-binding data (RFC 5929): the certificate's hash, taken with
    the certificate's own signature hash algorithm, SHA-256 when that is MD5 or SHA-1."""
    from asn1crypto.x509 import Certificate

    try:
        algorithm = Certificate.load(der).hash_algo
    except (ValueError, TypeError, KeyError):
        algorithm = "sha256"
    if algorithm in ("md5", "sha1") or algorithm not in hashlib.algorithms_available:
        algorithm = "sha256"
    return hashlib.new(algorithm, der).digest()
