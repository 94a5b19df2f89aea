"""SCRAM-SHA-256 and MD5 in protocol/scram.py: RFC 7677 vectors, interop with scramp (an
independent implementation), pass-through, channel binding, and malformed input."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scramp import ScramClient, ScramMechanism

from pypooler.protocol.errors import ChannelBindingError, PoolerError, ProtocolViolation
from pypooler.protocol.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    Md5Hash,
    PlainPassword,
    ScramClientExchange,
    ScramProofMismatch,
    ScramServerExchange,
    ScramVerifier,
    md5_hash,
    md5_response,
    mock_verifier,
    parse_secret,
)

# RFC 7677 section 3: user "user", password "pencil".
RFC_PASSWORD = "pencil"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
BINDING = hashlib.sha256(b"a certificate").digest()


def rfc_verifier() -> ScramVerifier:
    return ScramVerifier.from_password(RFC_PASSWORD, RFC_SALT, 4096)


# --- secrets ---------------------------------------------------------------------------------


def test_verifier_text_round_trips() -> None:
    verifier = rfc_verifier()
    text = str(verifier)

    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert ScramVerifier.parse(text) == verifier
    assert parse_secret(text) == verifier


def test_verifier_matches_scramp() -> None:
    salt, stored_key, server_key, iterations = ScramMechanism().make_auth_info(
        "s3cret", iteration_count=4096, salt=b"0123456789abcdef"
    )
    ours = ScramVerifier.from_password("s3cret", b"0123456789abcdef", 4096)

    assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == (
        salt, stored_key, server_key, iterations,
    )  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$x:c2FsdA==$a:b",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:!!!$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA==$c2hvcnQ=:c2hvcnQ=",
    ],
)
def test_broken_verifiers_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_secret(text)


def test_parse_secret_kinds() -> None:
    assert parse_secret("hunter2") == PlainPassword("hunter2")
    assert parse_secret("md5" + "0" * 32) == Md5Hash("md5" + "0" * 32)
    assert parse_secret("md5" + "0" * 31) == PlainPassword("md5" + "0" * 31)  # not a hash
    assert "hunter2" not in repr(parse_secret("hunter2"))


def test_md5_response_is_postgres_formula() -> None:
    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + b"salt").hexdigest().encode()

    assert md5_hash("secret", "alice") == "md5" + inner
    assert md5_response(md5_hash("secret", "alice"), b"salt") == expected


def test_mock_verifier_is_stable_per_user_and_distinct() -> None:
    key = b"k" * 32

    assert mock_verifier("alice", key) == mock_verifier("alice", key)
    assert mock_verifier("alice", key).salt != mock_verifier("bob", key).salt
    assert mock_verifier("alice", key) != mock_verifier("alice", b"j" * 32)


# --- RFC 7677 vectors --------------------------------------------------------------------------


def test_server_side_rfc7677_vector() -> None:
    server = ScramServerExchange(rfc_verifier(), server_nonce=RFC_SERVER_NONCE)

    assert server.client_first(MECHANISM, RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    assert server.client_key == hmac.new(salted, b"Client Key", "sha256").digest()


def test_client_side_rfc7677_vector() -> None:
    client = ScramClientExchange(password=RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, user="user")

    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.server_final(RFC_SERVER_FINAL)  # no exception: the server signature checks out


def test_client_refuses_a_wrong_server_signature() -> None:
    client = ScramClientExchange(password=RFC_PASSWORD, nonce=RFC_CLIENT_NONCE, user="user")
    client.server_first(RFC_SERVER_FIRST)

    with pytest.raises(ProtocolViolation, match="signature"):
        client.server_final(b"v=" + base64.b64encode(b"x" * 32))


# --- interop and pass-through ----------------------------------------------------------------


def scramp_login(server: ScramServerExchange, password: str) -> None:
    client = ScramClient([MECHANISM], "alice", password)
    first = server.client_first(MECHANISM, client.get_client_first().encode())
    client.set_server_first(first.decode())
    final = server.client_final(client.get_client_final().encode())
    client.set_server_final(final.decode())


def test_scramp_client_logs_in_to_our_server() -> None:
    server = ScramServerExchange(ScramVerifier.from_password("s3cret"))

    scramp_login(server, "s3cret")

    assert server.client_key is not None


def test_scramp_client_with_wrong_password_fails() -> None:
    server = ScramServerExchange(ScramVerifier.from_password("s3cret"))

    with pytest.raises(ScramProofMismatch):
        scramp_login(server, "wrong")
    assert server.client_key is None


def login(client: ScramClientExchange, server: ScramServerExchange, mechanism: str = MECHANISM) -> None:
    first = server.client_first(mechanism, client.client_first())
    final = server.client_final(client.server_first(first))
    client.server_final(final)


def test_pass_through_logs_in_with_the_recovered_client_key() -> None:
    verifier = ScramVerifier.from_password("s3cret")
    front = ScramServerExchange(verifier)
    login(ScramClientExchange(password="s3cret"), front)
    assert front.client_key is not None

    # pypooler, knowing only the verifier and the key, logs in to a server storing the same one.
    login(ScramClientExchange(pass_through=(verifier, front.client_key)), ScramServerExchange(verifier))


def test_pass_through_refuses_a_server_with_another_salt() -> None:
    verifier = ScramVerifier.from_password("s3cret")
    other = ScramVerifier.from_password("s3cret")  # same password, new salt
    front = ScramServerExchange(verifier)
    login(ScramClientExchange(password="s3cret"), front)
    assert front.client_key is not None

    with pytest.raises(ScramProofMismatch, match="salt"):
        login(ScramClientExchange(pass_through=(verifier, front.client_key)), ScramServerExchange(other))


def test_non_ascii_password_is_saslprepped_like_postgres() -> None:
    # U+00A0 (no-break space) maps to a plain space under SASLprep.
    server = ScramServerExchange(ScramVerifier.from_password("pass word"))

    login(ScramClientExchange(password="pass\u00a0word"), server)


# --- channel binding ---------------------------------------------------------------------------


def test_plus_is_offered_only_with_binding_data() -> None:
    assert ScramServerExchange(rfc_verifier()).mechanisms() == [MECHANISM]
    assert ScramServerExchange(rfc_verifier(), channel_binding=BINDING).mechanisms() == [
        MECHANISM_PLUS,
        MECHANISM,
    ]


def test_plus_login_with_matching_binding() -> None:
    server = ScramServerExchange(ScramVerifier.from_password("pw"), channel_binding=BINDING)

    login(ScramClientExchange(password="pw", channel_binding=BINDING), server, MECHANISM_PLUS)


def test_plus_login_with_other_binding_data_fails() -> None:
    server = ScramServerExchange(ScramVerifier.from_password("pw"), channel_binding=BINDING)

    with pytest.raises(ChannelBindingError, match="channel binding check failed"):
        login(ScramClientExchange(password="pw", channel_binding=b"\0" * 32), server, MECHANISM_PLUS)


def test_client_that_thinks_we_cannot_bind_is_refused() -> None:
    # 'y' over TLS while PLUS was offered: a man in the middle stripped it from the list.
    server = ScramServerExchange(ScramVerifier.from_password("pw"), channel_binding=BINDING)

    with pytest.raises(ChannelBindingError, match="negotiation"):
        login(ScramClientExchange(password="pw", tls=True), server)


def test_client_without_tls_binding_flag_n_is_fine_over_tls() -> None:
    server = ScramServerExchange(ScramVerifier.from_password("pw"), channel_binding=BINDING)

    login(ScramClientExchange(password="pw"), server)


@pytest.mark.parametrize(
    ("mechanism", "first", "error"),
    [
        (MECHANISM_PLUS, b"n,,n=,r=abc", ProtocolViolation),
        (MECHANISM, b"p=tls-server-end-point,,n=,r=abc", ProtocolViolation),
        (MECHANISM_PLUS, b"p=tls-unique,,n=,r=abc", ChannelBindingError),
        (MECHANISM, b"n,a=admin,n=,r=abc", ProtocolViolation),
        (MECHANISM, b"n,,m=ext,n=,r=abc", ProtocolViolation),
        (MECHANISM, b"n,,n=,r=a,b", ProtocolViolation),
        (MECHANISM, b"n,,r=abc", ProtocolViolation),
        (MECHANISM, b"x,,n=,r=abc", ProtocolViolation),
        (MECHANISM, b"n,,n=,r=\xff", ProtocolViolation),
        ("SCRAM-SHA-1", b"n,,n=,r=abc", ProtocolViolation),
    ],
)
def test_bad_client_first_messages(mechanism: str, first: bytes, error: type[Exception]) -> None:
    server = ScramServerExchange(rfc_verifier(), channel_binding=BINDING)

    with pytest.raises(error):
        server.client_first(mechanism, first)


@pytest.mark.parametrize(
    "final",
    [
        b"c=biws,r=WRONGNONCE,p=" + base64.b64encode(b"x" * 32),
        b"c=eSws,r=abcSERVER,p=" + base64.b64encode(b"x" * 32),
        b"c=biws,r=abcSERVER",
        b"c=biws,r=abcSERVER,p=short",
        b"r=abcSERVER,c=biws,p=" + base64.b64encode(b"x" * 32),
    ],
)
def test_bad_client_final_messages(final: bytes) -> None:
    server = ScramServerExchange(rfc_verifier(), server_nonce="SERVER")
    server.client_first(MECHANISM, b"n,,n=,r=abc")

    with pytest.raises((ProtocolViolation, ChannelBindingError)):
        server.client_final(final)


@settings(max_examples=300, deadline=None)
@given(first=st.binary(max_size=120), final=st.binary(max_size=160))
def test_random_scram_messages_only_raise_protocol_errors(first: bytes, final: bytes) -> None:
    server = ScramServerExchange(rfc_verifier(), channel_binding=BINDING)
    try:
        server.client_first(MECHANISM, first)
        server.client_final(final)
    except (PoolerError, ScramProofMismatch):
        pass
    assert server.client_key is None
