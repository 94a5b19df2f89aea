"""protocol/login.py without sockets: bytes in, bytes and events out, for every startup packet,
TLS, every authentication method (a real auth.ClientAuthExchange), the welcome, pipelined bytes,
and the protocol violations with their SQLSTATEs. Whole logins are also fed a byte at a time."""

from __future__ import annotations

import pytest

from pypooler.auth import Authenticator, ClientAuthExchange
from pypooler.config import load_settings
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import InvalidStartupPacket, PasswordAuthFailed, PoolerError, ProtocolViolation
from pypooler.protocol.login import (
    AUTHENTICATED,
    CLIENT_TERMINATED,
    HELD_LIMIT,
    START_TLS,
    TRANSITIONS,
    ClientLogin,
    LoginEvent,
    LoginState,
    build_welcome,
)
from pypooler.protocol.scram import MECHANISM, PlainPassword, ScramClientExchange

USER = "alice"
PASSWORD = "s3cret"
STARTUP = codec.build_startup_message({"user": USER, "database": "db"})
QUERY = codec.build_query("SELECT 1")
STATUSES = codec.AUTHENTICATION_OK + codec.build_parameter_status("server_version", "16")
Login = ClientLogin[ClientAuthExchange]


def exchange(method: str) -> ClientAuthExchange:
    auth = Authenticator(load_settings(None, env={}), auth_file={USER: PlainPassword(PASSWORD)})
    return auth.exchange(method, USER, PlainPassword(PASSWORD), channel_binding=None)


def feed(login: Login, data: bytes, *, bytewise: bool = False) -> list[LoginEvent]:
    """Feed `data` whole or a byte at a time; the events that came out."""
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    events = [login.receive_data(chunk) for chunk in chunks]
    return [event for event in events if event is not None]


def state_of(login: Login) -> LoginState:
    """The state now: mypy would carry an earlier assert's narrowing across the calls that move it."""
    return login.state


def password(text: str) -> bytes:
    return codec.build_password_message(text.encode())


def sqlstate(error: PoolerError) -> str:
    [(_, body)] = codec.MessageReader().feed(error.to_error_response())
    return codec.parse_error_fields(body)["C"]


# --- startup packets ----------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_startup_message_is_the_event_and_what_follows_it_is_held(bytewise: bool) -> None:
    login: Login = ClientLogin(tls_available=False)

    events = feed(login, STARTUP + QUERY, bytewise=bytewise)

    assert events == [codec.StartupMessage(c.PROTOCOL_3_0, {"user": USER, "database": "db"})]
    assert login.state is LoginState.CHECKING and login.data_to_send() == b""
    assert login.startup is not None and login.startup.raw == STARTUP
    login.accept()
    assert login.authenticate(None) is AUTHENTICATED
    out, held = login.welcome(STATUSES, 7, 8)
    assert out == STATUSES + codec.build_backend_key_data(7, 8) + codec.READY_FOR_QUERY_IDLE
    assert held == QUERY and state_of(login) is LoginState.DONE


@pytest.mark.parametrize("tls_available", [False, True])
def test_gssenc_is_refused_and_the_client_goes_on(tls_available: bool) -> None:
    login: Login = ClientLogin(tls_available=tls_available)
    gssenc = codec.STARTUP_HEADER.pack(8, c.GSSENC_REQUEST_CODE)

    assert feed(login, gssenc + STARTUP)[0] == codec.StartupMessage(
        c.PROTOCOL_3_0, {"user": USER, "database": "db"}
    )
    assert login.data_to_send() == b"N"


def test_ssl_without_client_tls_is_answered_n() -> None:
    login: Login = ClientLogin(tls_available=False)

    assert feed(login, codec.build_ssl_request() + STARTUP, bytewise=True)[0] == login.startup
    assert login.data_to_send() == b"N" and not login.tls


def test_ssl_with_client_tls_starts_the_handshake_then_reads_on() -> None:
    login: Login = ClientLogin(tls_available=True)

    assert feed(login, codec.build_ssl_request()) == [START_TLS]
    assert login.data_to_send() == b"S" and login.in_tls_handshake
    # Decrypted bytes the loop passes on before the handshake's end is reported are kept.
    assert feed(login, STARTUP[:10]) == []
    assert login.tls_started() is None
    assert login.tls and not login.in_tls_handshake
    assert feed(login, STARTUP[10:]) == [login.startup]


def test_a_second_ssl_request_inside_tls_is_a_violation() -> None:
    login: Login = ClientLogin(tls_available=True)
    feed(login, codec.build_ssl_request())
    login.tls_started()

    with pytest.raises(ProtocolViolation, match="already TLS") as excinfo:
        feed(login, codec.build_ssl_request())
    assert sqlstate(excinfo.value) == "08P01" and login.state is LoginState.ENDED


def test_bytes_sent_in_clear_after_the_ssl_request_are_a_violation() -> None:
    login: Login = ClientLogin(tls_available=True)

    with pytest.raises(ProtocolViolation, match="unencrypted data after SSL request"):
        feed(login, codec.build_ssl_request() + STARTUP)
    assert login.data_to_send() == b""  # no 'S': nothing may be said in TLS now


def test_a_cancel_request_is_the_event() -> None:
    login: Login = ClientLogin(tls_available=False)

    assert feed(login, codec.build_cancel_request(12, -34), bytewise=True) == [codec.CancelRequest(12, -34)]
    assert login.state is LoginState.ENDED
    assert feed(login, STARTUP) == []  # nothing more is read


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_startup_packet_over_the_limit_is_refused_with_08p01(bytewise: bool) -> None:
    filler = "x" * (c.MAX_STARTUP_PACKET + 5 - len(codec.build_startup_message({"user": USER, "o": ""})))
    packet = codec.build_startup_message({"user": USER, "o": filler})
    login: Login = ClientLogin(tls_available=False)

    with pytest.raises(InvalidStartupPacket) as excinfo:
        feed(login, packet, bytewise=bytewise)
    assert sqlstate(excinfo.value) == "08P01" and excinfo.value.silent  # closed without a word


def test_bytes_that_are_no_startup_packet_end_the_login_quietly() -> None:
    login: Login = ClientLogin(tls_available=False)

    with pytest.raises(InvalidStartupPacket) as excinfo:
        feed(login, codec.TERMINATE)
    assert excinfo.value.silent and login.state is LoginState.ENDED


def test_an_incomplete_startup_packet_is_counted() -> None:
    login: Login = ClientLogin(tls_available=False)
    feed(login, STARTUP[:-3])

    assert login.incomplete_startup_bytes() == len(STARTUP) - 3
    feed(login, STARTUP[-3:])
    assert login.incomplete_startup_bytes() == 0


def test_a_newer_minor_version_is_told_3_0_and_its_options_ignored() -> None:
    packet = codec.build_startup_message({"user": USER, "_pq_.opt": "1"})
    newer = packet[:4] + codec.INT32.pack(c.PROTOCOL_3_0 + 2) + packet[8:]
    login: Login = ClientLogin(tls_available=False)
    feed(login, newer)

    login.accept()

    assert login.data_to_send() == codec.build_negotiate_protocol_version(0, ["_pq_.opt"])


def test_too_much_sent_before_the_welcome_is_a_violation() -> None:
    login: Login = ClientLogin(tls_available=False)
    feed(login, STARTUP)
    feed(login, b"\0" * HELD_LIMIT)

    with pytest.raises(ProtocolViolation, match="too much data") as excinfo:
        feed(login, b"\0")
    assert sqlstate(excinfo.value) == "08P01"


# --- authentication ---------------------------------------------------------------------------


def logged_in_to_the_exchange(method: str) -> tuple[Login, bytes]:
    login: Login = ClientLogin(tls_available=False)
    feed(login, STARTUP)
    login.accept()
    assert login.authenticate(exchange(method)) is None
    return login, login.data_to_send()


@pytest.mark.parametrize("bytewise", [False, True])
def test_cleartext_then_the_pipelined_query_waits_for_the_welcome(bytewise: bool) -> None:
    login, request = logged_in_to_the_exchange("plain")
    assert request == codec.AUTHENTICATION_CLEARTEXT_PASSWORD

    assert feed(login, password(PASSWORD) + QUERY, bytewise=bytewise) == [AUTHENTICATED]
    out, held = login.welcome(STATUSES, 1, 2)
    assert out == build_welcome(STATUSES, 1, 2) and held == QUERY
    assert login.exchange is not None and login.exchange.outcome.password == PASSWORD


def test_bytes_sent_before_the_exchange_starts_are_fed_to_it() -> None:
    login: Login = ClientLogin(tls_available=False)
    feed(login, STARTUP + password(PASSWORD))  # pipelined while the secret is looked up
    login.accept()

    assert login.authenticate(exchange("plain")) is AUTHENTICATED
    assert login.data_to_send() == codec.AUTHENTICATION_CLEARTEXT_PASSWORD


def test_scram_final_message_goes_out_with_the_welcome() -> None:
    login, request = logged_in_to_the_exchange("scram-sha-256")
    [(_, body)] = codec.MessageReader().feed(request)
    assert codec.parse_authentication(body)[0] == c.AUTH_SASL
    client = ScramClientExchange(password=PASSWORD)

    assert feed(login, codec.build_sasl_initial_response(MECHANISM, client.client_first())) == []
    [(_, body)] = codec.MessageReader().feed(login.data_to_send())
    code, server_first = codec.parse_authentication(body)
    assert code == c.AUTH_SASL_CONTINUE
    assert feed(login, codec.build_sasl_response(client.server_first(server_first))) == [AUTHENTICATED]

    out, _ = login.welcome(STATUSES, 1, 2)
    [(_, final), *_] = codec.MessageReader().feed(out)
    assert codec.parse_authentication(final)[0] == c.AUTH_SASL_FINAL
    assert out.endswith(build_welcome(STATUSES, 1, 2))


def test_a_wrong_password_is_28p01() -> None:
    login, _ = logged_in_to_the_exchange("md5")

    with pytest.raises(PasswordAuthFailed) as excinfo:
        feed(login, password("md5" + "0" * 32))
    assert sqlstate(excinfo.value) == "28P01" and login.state is LoginState.ENDED


def test_a_terminate_while_authenticating_ends_the_login_without_a_word() -> None:
    login, _ = logged_in_to_the_exchange("plain")

    assert feed(login, codec.TERMINATE) == [CLIENT_TERMINATED]
    assert login.data_to_send() == b"" and login.state is LoginState.ENDED


def test_an_oversized_auth_message_is_a_violation() -> None:
    login, _ = logged_in_to_the_exchange("plain")

    with pytest.raises(ProtocolViolation, match="limit"):
        feed(login, codec.pack_header(c.F_PASSWORD, 1 << 20))  # refused before the body comes


def test_cert_asks_nothing() -> None:
    login: Login = ClientLogin(tls_available=True)
    feed(login, STARTUP)
    login.accept()

    assert login.authenticate(exchange("cert")) is AUTHENTICATED
    assert login.data_to_send() == b""


def test_the_console_takes_over_with_what_the_client_pipelined() -> None:
    login: Login = ClientLogin(tls_available=False)
    feed(login, STARTUP + QUERY)
    login.accept()
    login.authenticate(None)

    assert login.hand_over() == (b"", QUERY)


# --- transitions --------------------------------------------------------------------------------


def test_every_state_is_in_the_table_and_the_ends_lead_nowhere() -> None:
    assert set(TRANSITIONS) == set(LoginState)
    assert TRANSITIONS[LoginState.DONE] == TRANSITIONS[LoginState.ENDED] == frozenset()


def test_a_step_out_of_order_is_refused() -> None:
    login: Login = ClientLogin(tls_available=False)

    with pytest.raises(RuntimeError, match="STARTUP -> DONE"):
        login.welcome(STATUSES, 1, 2)
    with pytest.raises(RuntimeError, match="STARTUP -> ACCEPTED"):
        login.accept()
