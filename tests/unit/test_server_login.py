"""protocol/server_login.py: the server login machine, fed the server's bytes (whole, and one
byte at a time), checked on the bytes it answers and the events it reports. No server, no socket;
the SCRAM server side is pypooler's own `ScramServerExchange` (checked against scramp in
test_scram)."""

from __future__ import annotations

import pytest

from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import (
    PoolerError,
    ProtocolViolation,
    ServerAuthIncomplete,
    ServerConnectFailed,
    ServerLoginFailed,
    build_error_response,
    build_notice_response,
)
from pypooler.protocol.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    Md5Hash,
    ScramClientExchange,
    ScramServerExchange,
    ScramVerifier,
    certificate_hash,
    md5_hash,
    md5_response,
)
from pypooler.protocol.server_login import (
    LoggedIn,
    LoginEvent,
    LoginFailed,
    LoginState,
    ScramStarted,
    ServerLoginExchange,
    StartTls,
)

WELCOME = (
    codec.build_parameter_status("server_version", "16.4")
    + codec.build_parameter_status("TimeZone", "UTC")
    + codec.build_backend_key_data(4242, -7)
    + codec.build_ready_for_query()
)
OK = codec.AUTHENTICATION_OK
STARTUP = codec.build_startup_message({"user": "alice", "database": "app"})
CERTIFICATE = b"\x30\x03\x02\x01\x00"  # not a parseable certificate: its hash falls back to SHA-256


def exchange(**values: object) -> ServerLoginExchange:
    return ServerLoginExchange("alice", "app", target="alice@db:5432/app", **values)  # type: ignore[arg-type]


def frontend_messages(data: bytes) -> list[tuple[int, bytes]]:
    reader = codec.MessageReader()
    messages = reader.feed(data)
    assert not len(reader)
    return messages


def failure(events: list[LoginEvent]) -> PoolerError:
    assert len(events) == 1 and isinstance(events[0], LoginFailed), events
    return events[0].error


def test_trust_login_collects_parameters_and_backend_key() -> None:
    login = exchange()
    assert login.start() == STARTUP

    events = login.receive_data(codec.AUTHENTICATION_OK + WELCOME)

    assert [type(e) for e in events] == [LoggedIn]
    assert login.state is LoginState.LOGGED_IN and login.data_to_send() == b""
    assert login.parameters == {"server_version": "16.4", "TimeZone": "UTC"}
    assert (login.process_id, login.secret_key) == (4242, -7)


def test_one_byte_at_a_time() -> None:
    login = exchange(password="s3cret")
    login.start()
    stream = codec.AUTHENTICATION_CLEARTEXT_PASSWORD + codec.AUTHENTICATION_OK + WELCOME
    events: list[LoginEvent] = []
    sent = b""
    for i in range(len(stream)):
        events += login.receive_data(stream[i : i + 1])
        sent += login.data_to_send()

    assert [type(e) for e in events] == [LoggedIn]
    assert frontend_messages(sent) == [(c.F_PASSWORD, b"s3cret\0")]
    assert login.parameters["TimeZone"] == "UTC"


def test_notices_during_login_are_dropped() -> None:
    login = exchange()
    notice = build_notice_response("hello")
    events = login.receive_data(notice + codec.AUTHENTICATION_OK + notice + WELCOME)
    assert [type(e) for e in events] == [LoggedIn]


@pytest.mark.parametrize("secret", [None, "md5"])
def test_md5_with_the_password_or_its_hash(secret: str | None) -> None:
    hashed = md5_hash("s3cret", "alice")
    login = exchange(password="s3cret") if secret is None else exchange(secret=Md5Hash(hashed))
    salt = b"\x01\x02\x03\x04"

    assert login.receive_data(codec.build_authentication(c.AUTH_MD5, salt)) == []

    assert frontend_messages(login.data_to_send()) == [(c.F_PASSWORD, md5_response(hashed, salt) + b"\0")]


def scram_login(login: ServerLoginExchange, server: ScramServerExchange) -> list[LoginEvent]:
    """Run the SASL exchange between the machine and `server`, then the welcome."""
    events = login.receive_data(codec.build_authentication_sasl(server.mechanisms()))
    ((msg_type, body),) = frontend_messages(login.data_to_send())
    assert msg_type == c.F_PASSWORD
    mechanism, first = codec.parse_sasl_initial_response(body)
    server_first = server.client_first(mechanism, first)
    events += login.receive_data(codec.build_authentication(c.AUTH_SASL_CONTINUE, server_first))
    ((msg_type, body),) = frontend_messages(login.data_to_send())
    server_final = server.client_final(body)
    events += login.receive_data(
        codec.build_authentication(c.AUTH_SASL_FINAL, server_final) + codec.AUTHENTICATION_OK + WELCOME
    )
    return events


def test_scram_with_the_password() -> None:
    login = exchange(password="s3cret")
    events = scram_login(login, ScramServerExchange(ScramVerifier.from_password("s3cret")))

    assert [type(e) for e in events] == [ScramStarted, LoggedIn]
    started = events[0]
    assert isinstance(started, ScramStarted)
    assert (started.mechanism, started.pass_through) == (MECHANISM, False)


def client_key_for(verifier: ScramVerifier, password: str) -> bytes:
    """The ClientKey a client proves to pypooler when it logs in with SCRAM (pass-through)."""
    front = ScramServerExchange(verifier)
    client = ScramClientExchange(password=password)
    server_first = front.client_first(MECHANISM, client.client_first())
    client.server_final(front.client_final(client.server_first(server_first)))
    assert front.client_key is not None
    return front.client_key


def test_scram_pass_through_with_a_clients_key() -> None:
    verifier = ScramVerifier.from_password("s3cret")
    login = exchange(secret=verifier, client_key=client_key_for(verifier, "s3cret"))

    events = scram_login(login, ScramServerExchange(verifier))

    assert isinstance(events[0], ScramStarted) and events[0].pass_through
    assert isinstance(events[-1], LoggedIn)


def test_scram_pass_through_against_another_verifier_fails_clearly() -> None:
    verifier = ScramVerifier.from_password("s3cret")
    login = exchange(secret=verifier, client_key=client_key_for(verifier, "s3cret"))
    server = ScramServerExchange(ScramVerifier.from_password("s3cret"))  # same password, new salt

    login.receive_data(codec.build_authentication_sasl(server.mechanisms()))
    ((_, body),) = frontend_messages(login.data_to_send())
    server_first = server.client_first(*codec.parse_sasl_initial_response(body))
    error = failure(login.receive_data(codec.build_authentication(c.AUTH_SASL_CONTINUE, server_first)))

    assert isinstance(error, ServerLoginFailed)
    assert error.message.startswith("SCRAM pass-through for user 'alice' cannot work: ")
    assert "pg_authid" in (error.hint or "")
    assert login.state is LoginState.FAILED and login.data_to_send() == b""


def test_scram_over_tls_binds_to_the_servers_certificate() -> None:
    verifier = ScramVerifier.from_password("s3cret")
    login = exchange(secret=verifier, client_key=client_key_for(verifier, "s3cret"), tls_mode="require")
    assert login.start() == codec.build_ssl_request()

    assert [type(e) for e in login.receive_data(b"S")] == [StartTls]
    assert login.state is LoginState.TLS_HANDSHAKE and login.data_to_send() == b""
    login.tls_established(CERTIFICATE)
    assert login.data_to_send() == STARTUP

    server = ScramServerExchange(verifier, channel_binding=certificate_hash(CERTIFICATE))
    assert server.mechanisms()[0] == MECHANISM_PLUS
    events = scram_login(login, server)

    assert isinstance(events[0], ScramStarted) and events[0].mechanism == MECHANISM_PLUS
    assert isinstance(events[-1], LoggedIn)


def scram_until_final(password: str = "s3cret") -> ServerLoginExchange:
    """A login whose SCRAM exchange has reached the point where the server's SASLFinal is due."""
    login = exchange(password=password)
    server = ScramServerExchange(ScramVerifier.from_password(password))
    login.receive_data(codec.build_authentication_sasl(server.mechanisms()))
    ((_, body),) = frontend_messages(login.data_to_send())
    server_first = server.client_first(*codec.parse_sasl_initial_response(body))
    login.receive_data(codec.build_authentication(c.AUTH_SASL_CONTINUE, server_first))
    login.data_to_send()
    return login


def test_a_wrong_server_signature_fails_the_login() -> None:
    login = scram_until_final()

    error = failure(login.receive_data(codec.build_authentication(c.AUTH_SASL_FINAL, b"v=AAAA")))
    assert isinstance(error, ProtocolViolation) and "signature is wrong" in error.message


# --- TLS answers ------------------------------------------------------------------------------


def test_no_tls_with_prefer_goes_on_in_clear() -> None:
    login = exchange(tls_mode="prefer")
    assert login.start() == codec.build_ssl_request()

    assert login.receive_data(b"N") == []

    assert login.data_to_send() == STARTUP and login.state is LoginState.AUTHENTICATING
    assert isinstance(login.receive_data(codec.AUTHENTICATION_OK + WELCOME)[0], LoggedIn)
    assert not login.tls


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_no_tls_when_it_is_required_fails(mode: str) -> None:
    login = exchange(tls_mode=mode)
    login.start()

    error = failure(login.receive_data(b"N"))

    assert type(error) is ServerConnectFailed and error.sqlstate == "08001"
    assert error.message == f"server alice@db:5432/app does not support SSL, but server_tls_sslmode is {mode}"
    assert login.data_to_send() == b""


@pytest.mark.parametrize("answer", [b"SX", b"N" + codec.AUTHENTICATION_OK])
def test_bytes_after_the_tls_answer_fail_the_login(answer: bytes) -> None:
    # After 'S' they would be taken as if they came through TLS (CVE-2021-23222).
    login = exchange(tls_mode="prefer")
    login.start()

    error = failure(login.receive_data(answer))

    assert type(error) is ProtocolViolation and error.sqlstate == "08P01"
    assert error.message == "server sent unencrypted data after its answer to SSLRequest"


def test_bytes_before_the_handshake_fail_the_login() -> None:
    login = exchange(tls_mode="require")
    login.start()
    login.receive_data(b"S")

    error = failure(login.receive_data(b"\x16"))

    assert error.message == "server sent data during the TLS handshake"
    login.tls_established(CERTIFICATE)  # the adapter's handshake may finish anyway: nothing to send
    assert login.state is LoginState.FAILED and login.data_to_send() == b""


def test_connection_lost_names_the_step() -> None:
    login = exchange(tls_mode="require")
    assert login.connection_lost("EOF").message == (
        "server closed the connection before answering SSLRequest: EOF"
    )
    assert exchange().connection_lost("EOF").message == "server closed the connection during login: EOF"


# --- refusals ---------------------------------------------------------------------------------


def test_the_servers_error_keeps_its_sqlstate() -> None:
    login = exchange(password="wrong")
    login.receive_data(codec.AUTHENTICATION_CLEARTEXT_PASSWORD)
    login.data_to_send()

    error = failure(
        login.receive_data(
            build_error_response("FATAL", "28P01", 'password authentication failed for user "alice"')
        )
    )

    assert type(error) is ServerLoginFailed and error.sqlstate == "28P01"
    assert error.message == 'server login failed: password authentication failed for user "alice"'
    assert error.detail == "pypooler could not log in to alice@db:5432/app"
    assert login.receive_data(WELCOME) == []  # failed is final


@pytest.mark.parametrize(
    ("values", "request_", "message"),
    [
        ({}, codec.AUTHENTICATION_CLEARTEXT_PASSWORD, "server asks for a password for user 'alice' but none"),
        (
            {"secret": Md5Hash(md5_hash("s3cret", "alice"))},
            codec.AUTHENTICATION_CLEARTEXT_PASSWORD,
            "server asks for a cleartext password for user 'alice', but pypooler knows only an MD5 hash",
        ),
        (
            {"secret": ScramVerifier.from_password("s3cret")},
            codec.build_authentication(c.AUTH_MD5, b"salt"),
            "server asks for MD5 password authentication for user 'alice', but pypooler knows only a SCRAM",
        ),
        (
            {"secret": Md5Hash(md5_hash("s3cret", "alice"))},
            codec.build_authentication_sasl([MECHANISM]),
            "server asks for SCRAM-SHA-256 authentication for user 'alice', but pypooler knows only an MD5",
        ),
        (
            {"secret": ScramVerifier.from_password("s3cret")},
            codec.build_authentication_sasl([MECHANISM]),
            "server asks for SCRAM-SHA-256 for user 'alice': pypooler has only its SCRAM verifier",
        ),
        (
            {"password": "s3cret"},
            codec.build_authentication_sasl(["SCRAM-SHA-512"]),
            "server offers SASL mechanisms ['SCRAM-SHA-512'], pypooler supports SCRAM-SHA-256",
        ),
        (
            {"password": "s3cret"},
            codec.build_authentication(7),
            "server requested authentication method GSSAPI, which pypooler does not support",
        ),
    ],
)
def test_requests_pypooler_cannot_answer(values: dict[str, object], request_: bytes, message: str) -> None:
    login = exchange(**values)

    error = failure(login.receive_data(request_))

    assert type(error) is ServerLoginFailed and error.sqlstate == "28000"
    assert error.message.startswith(message), error.message
    assert login.data_to_send() == b""


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (codec.build_authentication(c.AUTH_SASL_CONTINUE, b"r=x"), "server sent SASLContinue without SASL"),
        (codec.build_authentication(c.AUTH_SASL_FINAL, b"v=x"), "server sent SASLFinal without SASL"),
        (WELCOME, "unexpected message 'S' from server during login"),  # before AuthenticationOk
        (OK + codec.AUTHENTICATION_OK, "unexpected message 'R' from server during login"),
        (OK + codec.build_data_row(["1"]), "unexpected message 'D' from server during login"),
        (OK + WELCOME + codec.build_ready_for_query(), "after ReadyForQuery during login"),
        (OK + WELCOME + b"Z\0", "after ReadyForQuery during login"),  # a partial message too
    ],
)
def test_protocol_violations(stream: bytes, message: str) -> None:
    login = exchange(password="s3cret")

    error = failure(login.receive_data(stream))

    assert type(error) is ProtocolViolation and error.sqlstate == "08P01"
    assert message in error.message


def test_authentication_ok_before_the_scram_exchange_is_complete_is_refused() -> None:
    # A server that skips SASLFinal (its signature) has not proved it knows the password.
    login = scram_until_final()

    error = failure(login.receive_data(codec.AUTHENTICATION_OK + WELCOME))

    assert isinstance(error, ServerAuthIncomplete) and error.sqlstate == "08001"
    assert "without proving it knows the password" in error.message
    assert login.state is LoginState.FAILED and login.data_to_send() == b""
