"""The pure parts of LISTEN multiplexing: statements, messages, replies, the channel map."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypooler.listening import ChannelMap
from pypooler.protocol import codec, errors
from pypooler.protocol import constants as c
from pypooler.protocol.listen import (
    LISTEN,
    UNLISTEN,
    listen_reply,
    listen_request,
    may_be_listen,
    notification_channel,
    parse_listen_statement,
    quote_channel,
    truncate_identifier,
    unlisten_channels,
)
from tests.support.messages import SYNC, bind, describe, execute, extended, parse, types

# --- statements ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("LISTEN news", (LISTEN, b"news")),
        ("listen News", (LISTEN, b"news")),  # unquoted: folded to lower case
        ('LISTEN "News"', (LISTEN, b"News")),  # quoted: kept
        ('LISTEN "a ""quoted"" name"', (LISTEN, b'a "quoted" name')),
        ('LISTEN"x"', (LISTEN, b"x")),
        ("  LISTEN\n\tx ;; ", (LISTEN, b"x")),
        ("/* a /* nested */ comment */ LISTEN x -- trailing", (LISTEN, b"x")),
        ("-- first\nLISTEN x;", (LISTEN, b"x")),
        ("LISTEN _x$1", (LISTEN, b"_x$1")),
        ("LISTEN Ünïcödé", (LISTEN, "Ünïcödé".encode())),  # only ASCII letters are folded
        ("LISTEN user_table", (LISTEN, b"user_table")),
        ("UNLISTEN x", (UNLISTEN, b"x")),
        ("unlisten *", (UNLISTEN, None)),
        ("UNLISTEN*;", (UNLISTEN, None)),
    ],
)  # fmt: skip
def test_listen_statements(sql: str, expected: tuple[str, bytes | None]) -> None:
    parsed = parse_listen_statement(sql.encode())
    assert parsed is not None
    assert parsed[:2] == expected


@pytest.mark.parametrize(
    "sql",
    ["LISTEN", "LISTEN *", "LISTEN a b", "LISTEN a; SELECT 1", "SELECT 1; LISTEN a", 'LISTEN ""',
     'LISTEN "open', "LISTEN select", "LISTEN user", "LISTEN 1abc", 'LISTEN U&"d\\0061t"',
     "LISTENx", "NOTIFY x", "LISTEN x /* open", "", "UNLISTEN * x", "LISTEN 'x'"],
)  # fmt: skip
def test_what_is_left_to_the_server(sql: str) -> None:
    assert parse_listen_statement(sql.encode()) is None


def test_names_are_truncated_to_63_bytes_at_a_character_boundary() -> None:
    assert truncate_identifier(b"a" * 70) == b"a" * 63
    name = b"a" * 62 + "é".encode()  # 64 bytes, the last character across the limit
    assert truncate_identifier(name) == b"a" * 62
    parsed = parse_listen_statement(b"LISTEN " + b"x" * 100)
    assert parsed is not None and parsed[1] == b"x" * 63 and parsed[2] == b"x" * 100
    request = listen_request(codec.build_query("LISTEN " + "x" * 100))
    assert request is not None and request.channel == b"x" * 63
    notice = request.notice
    assert notice[:1] == b"N" and b"42622" in notice and b"will be truncated" in notice
    assert listen_reply(request, c.TX_IDLE).startswith(notice)


def test_unlistens_among_other_statements() -> None:
    reset = b"SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"  # asyncpg's
    assert unlisten_channels(reset) == [None]
    assert unlisten_channels(b'UNLISTEN a; SELECT 1; unlisten "B"') == [b"a", b"B"]
    assert unlisten_channels(b"LISTEN a; SELECT 1") == []


# --- messages -----------------------------------------------------------------------------------


NAMED_BIND = bind("stmt_1") + execute() + SYNC


def test_a_simple_query_of_one_statement() -> None:
    request = listen_request(codec.build_query("LISTEN a"))
    assert request is not None and (request.action, request.channel, request.shape) == (LISTEN, b"a", b"Q")
    assert listen_request(codec.build_query("LISTEN a") + codec.build_query("SELECT 1")) is None
    assert listen_request(codec.build_query("LISTEN a")[:-2]) is None  # cut short
    assert listen_request(codec.build_query("SELECT 1")) is None


def test_extended_batches() -> None:
    request = listen_request(extended("UNLISTEN *", flush=True))
    assert request is not None and (request.action, request.channel) == (UNLISTEN, None)
    assert request.shape == b"PBdEHS"
    assert listen_request(extended("LISTEN a", describe_kind="")) is not None
    assert listen_request(extended("LISTEN a")[:-5]) is None  # no Sync: the batch is not whole
    assert listen_request(extended("LISTEN a") + SYNC) is None
    named_parse = parse("s1", "LISTEN a") + extended("LISTEN a")[16:]
    assert listen_request(named_parse) is None
    with_values = extended("LISTEN a").replace(b"\0\0\0\0\0\0\0\0", b"\0\0\0\0\0\x01\0\0", 1)
    assert listen_request(with_values) is None


def test_a_bind_of_a_named_statement_needs_its_text() -> None:
    assert listen_request(NAMED_BIND) is None
    request = listen_request(NAMED_BIND, b'LISTEN "ch"')
    assert request is not None and request.channel == b"ch" and request.shape == b"BES"
    assert listen_request(NAMED_BIND, b"SELECT 1") is None


def test_replies_match_the_messages_one_for_one() -> None:
    query = listen_request(codec.build_query("LISTEN a"))
    assert query is not None
    listened = codec.build_command_complete("LISTEN") + codec.READY_FOR_QUERY_IDLE
    assert listen_reply(query, c.TX_IDLE) == listened
    assert listen_reply(query, c.TX_IN_TRANSACTION)[-1:] == b"T"
    batch = listen_request(extended("LISTEN a", flush=True))
    assert batch is not None
    assert types(listen_reply(batch, c.TX_IDLE)) == "12nCZ"
    described = listen_request(parse("", "UNLISTEN a") + describe() + bind() + execute() + SYNC)
    assert described is not None
    reply = listen_reply(described, c.TX_IDLE)
    assert types(reply) == "1tn2CZ" and codec.build_command_complete("UNLISTEN") in reply
    failed = listen_reply(batch, c.TX_FAILED)
    assert types(failed) == "EZ" and b"25P02" in failed and failed.endswith(b"E")
    error = errors.build_error_response("ERROR", "08001", "no listener")
    assert listen_reply(query, c.TX_IDLE, error) == error + codec.READY_FOR_QUERY_IDLE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_the_quick_look_never_misses_a_listen(text: bytes) -> None:
    for sql in (b"LISTEN " + text, b"UNLISTEN " + text, b"  listen " + text, b"/**/Listen " + text):
        message = codec.build_message(c.F_QUERY, sql.replace(b"\0", b"") + b"\0")
        if listen_request(message) is not None:
            assert may_be_listen(message)
    assert not may_be_listen(codec.build_query("SELECT 1"))


def test_notification_channel_and_quoting() -> None:
    body = (1234).to_bytes(4, "big") + b"chan\0payload\0"
    assert notification_channel(body) == b"chan"
    assert quote_channel(b'a"b') == b'"a""b"'
    assert parse_listen_statement(b"LISTEN " + quote_channel(b'We"ird')) == (LISTEN, b'We"ird', b'We"ird')


# --- the channel map ----------------------------------------------------------------------------


class Subscriber:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def notify(self, message: bytes) -> None:
        self.messages.append(message)


def test_the_channel_map_says_when_to_listen_and_unlisten() -> None:
    channels = ChannelMap()
    first, second = Subscriber(), Subscriber()
    assert channels.listen(first, b"a") is True  # new: the listener connection must LISTEN
    assert channels.listen(second, b"a") is False
    assert channels.listen(first, b"a") is False  # twice is once, as in PostgreSQL
    assert channels.listen(first, b"b") is True
    assert channels.subscribers(b"a") == {first, second}
    assert channels.channels_of(first) == {b"a", b"b"}
    assert len(channels) == 2
    assert channels.unlisten(first, b"a") is False  # second still listens
    assert channels.unlisten(first, b"a") is False  # not listening any more: nothing to do
    assert channels.unlisten(second, b"zzz") is False
    assert channels.unlisten(second, b"a") is True  # the last one: UNLISTEN
    assert channels.unlisten_all(first) == [b"b"]
    assert channels.unlisten_all(first) == []
    assert len(channels) == 0 and not channels.by_subscriber


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([b"a", b"b", b"c", None]), st.booleans())))
def test_the_channel_map_agrees_with_a_model(steps: list[tuple[int, bytes | None, bool]]) -> None:
    subscribers = [Subscriber() for _ in range(4)]
    channels = ChannelMap()
    model: dict[int, set[bytes]] = {i: set() for i in range(4)}
    listened: set[bytes] = set()  # what the listener connection would listen on
    for who, channel, listen in steps:
        subscriber = subscribers[who]
        if channel is None:
            for gone in channels.unlisten_all(subscriber):
                listened.discard(gone)
            model[who].clear()
        elif listen:
            if channels.listen(subscriber, channel):
                listened.add(channel)
            model[who].add(channel)
        else:
            if channels.unlisten(subscriber, channel):
                listened.discard(channel)
            model[who].discard(channel)
        wanted = set().union(*model.values())
        assert listened == wanted == set(channels.by_channel)
        for i, subscriber_ in enumerate(subscribers):
            assert channels.channels_of(subscriber_) == model[i]
