"""Tests for pypooler.rewriting (with prepared.py): named statements across shared servers.

Each scenario runs twice: every client on a direct connection of its own (a `ModelServer` each),
and through pypooler's streams, where clients take turns on a few shared model servers. What a
client sees must be byte for byte the same. Reads are cut at every byte or at random points, on
both sides, and the verdict must not change.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pypooler.prepared import ClientStatements, SchemaVersion, ServerStatements, StatementRegistry
from pypooler.protocol import codec, errors
from pypooler.protocol import constants as c
from pypooler.protocol.errors import ProtocolViolation
from pypooler.protocol.transaction import releasable
from pypooler.rewriting import PLACEHOLDER_CLOSE, RewritingBackend, RewritingFrontend
from tests.support.messages import FLUSH, SYNC, bind, close, describe, execute, parse, query
from tests.support.model_server import ModelServer

FUZZ = settings(max_examples=150, deadline=None)


# --------------------------------------------------------------------------- the two worlds


@dataclass
class Shared:
    model: ModelServer
    statements: ServerStatements
    backend: RewritingBackend
    parameters: dict[str, str] = field(default_factory=dict)


class Pooled:
    """Clients over shared model servers, through pypooler's streams."""

    def __init__(self, servers: int = 1, capacity: int = 200, *, refuse: bool = False) -> None:
        self.registry = StatementRegistry()
        self.servers = []
        for _ in range(servers):
            shared = Shared(ModelServer(), ServerStatements(self.registry, capacity), RewritingBackend())
            shared.backend.on_parameter_status = shared.parameters.__setitem__
            self.servers.append(shared)
        self.clients: dict[int, RewritingFrontend] = {}
        self.holder: dict[int, int] = {}  # server -> client holding it mid-transaction
        self.refuse = refuse

    def frontend(self, client: int) -> RewritingFrontend:
        if client not in self.clients:
            self.clients[client] = RewritingFrontend(ClientStatements(self.registry), refuse=self.refuse)
        return self.clients[client]

    def run(self, client: int, server: int, data: bytes, rng: random.Random | None = None) -> bytes:
        """`client` sends `data` (a whole batch) on `server`; what the client receives."""
        frontend = self.frontend(client)
        shared = self.servers[server]
        if self.holder.get(server) != client:
            shared.statements.begin_lend()
        seen = []
        for chunk in cuts(data, rng):
            replies = shared.model.receive(frontend.feed_to(chunk, shared.statements))
            for part in cuts(replies, rng):
                shared.backend.feed(part, frontend)
                replaced = shared.backend.replaced
                shared.backend.replaced = None
                seen.append(part if replaced is None else replaced)
        assert frontend.at_rest and shared.backend.at_message_boundary
        assert not frontend.batches, "a batch was left unsettled"
        if releasable(frontend, shared.backend):
            self.holder.pop(server, None)
        else:
            self.holder[server] = client
        return b"".join(seen)


class Direct:
    """Every client on its own model server."""

    def __init__(self) -> None:
        self.models: dict[int, ModelServer] = {}

    def run(self, client: int, data: bytes) -> bytes:
        return self.models.setdefault(client, ModelServer()).receive(data)


def cuts(data: bytes, rng: random.Random | None) -> list[bytes]:
    if rng is None or len(data) < 2:
        return [data]
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4))))
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


Step = tuple[int, int, bytes]  # (client, server, bytes of one batch)


def check(steps: list[Step], servers: int = 2, capacity: int = 200, seed: int | None = None) -> Pooled:
    direct = Direct()
    pooled = Pooled(servers, capacity)
    rng = random.Random(seed) if seed is not None else None
    for number, (client, wanted, data) in enumerate(steps):
        # As in the pool: a client inside a transaction keeps its server; a held server is
        # nobody else's (a step that would need one is left out in both worlds).
        held = [server for server, holder in pooled.holder.items() if holder == client]
        server = held[0] if held else wanted
        if pooled.holder.get(server, client) != client:
            continue
        expected = direct.run(client, data)
        assert pooled.run(client, server, data, rng) == expected, f"step {number}: {data!r}"
    return pooled


def statement_names(model: ModelServer) -> set[bytes]:
    return set(model.statements) - {b""}


def prepared_statement(name: str, text: str) -> bytes:
    """How drivers prepare: Parse, Describe statement, Sync."""
    return parse(name, text) + describe(name) + SYNC


def run_prepared(name: str) -> bytes:
    return bind(name) + execute() + SYNC


def replies(data: bytes) -> list[str]:
    """Message types, with the SQLSTATE of errors and the status of ReadyForQuery."""
    shown = []
    for msg_type, body in codec.MessageReader().feed(data):
        if msg_type == c.B_ERROR_RESPONSE:
            shown.append("E " + codec.parse_error_fields(body)["C"])
        elif msg_type == c.B_READY_FOR_QUERY:
            shown.append("Z " + body.decode())
        else:
            shown.append(chr(msg_type))
    return shown


# --------------------------------------------------------------------------- pass-through


def test_traffic_without_named_statements_is_forwarded_as_the_same_object() -> None:
    pooled = Pooled()
    frontend = pooled.frontend(1)
    server = pooled.servers[0].statements
    for data in (
        query("SELECT 1"),
        parse("", "SELECT $1", (23,)) + bind(parameter=b"42") + describe("", "P") + execute() + SYNC,
        bind(portal="cursor") + execute("cursor") + FLUSH + SYNC,
        describe("", "S") + close("", "S") + close("cursor", "P") + SYNC,
    ):
        assert frontend.feed_to(data, server) is data
    backend = pooled.servers[0].backend
    reply = (codec.build_command_complete("SELECT 1") + codec.build_ready_for_query(c.TX_IDLE)) * 4
    assert backend.feed(reply, frontend) == len(reply) and backend.replaced is None
    # Nor does it cost an idle client a reply plan (10,000 idle clients x an empty deque).
    assert frontend.batches is None


def test_untracked_named_statements_pass_through() -> None:
    frontend = RewritingFrontend(None)
    data = parse("s1", "SELECT 1") + bind("s1") + execute() + close("s1") + SYNC
    assert frontend.feed_to(data, None) is data


# --------------------------------------------------------------------------- sharing


def test_clients_share_one_server_statement_per_text_and_keep_their_own_names() -> None:
    steps = [
        (1, 0, prepared_statement("s1", "SELECT 'a'")),
        (2, 0, prepared_statement("s1", "SELECT 'b'")),  # same name, other text
        (3, 0, prepared_statement("other", "SELECT 'a'")),  # other name, same text
        (1, 0, run_prepared("s1")),
        (2, 0, run_prepared("s1")),
        (3, 0, run_prepared("other")),
    ]
    pooled = check(steps)
    model = pooled.servers[0].model
    assert statement_names(model) == {b"PYPOOLER_1", b"PYPOOLER_2"}
    parses = [body for msg_type, body in model.received if msg_type == c.F_PARSE]
    assert len(parses) == 2  # client 3's Parse was answered by a placeholder
    assert len(pooled.registry) == 2


def test_a_server_that_never_saw_a_statement_gets_it_parsed_first() -> None:
    steps = [
        (1, 0, prepared_statement("s1", "SELECT 1")),
        (1, 1, run_prepared("s1")),
        (1, 1, run_prepared("s1")),
        (1, 1, describe("s1") + SYNC),
    ]
    pooled = check(steps)
    model = pooled.servers[1].model
    parses = [body for msg_type, body in model.received if msg_type == c.F_PARSE]
    assert parses == [b"PYPOOLER_1\0SELECT 1\0\0\0"]  # once, then the LRU knows


def test_parse_bind_execute_in_one_batch_on_a_fresh_server() -> None:
    check([(1, 0, parse("s1", "SELECT 1") + bind("s1") + describe("s1") + execute() + SYNC),
           (2, 0, parse("s2", "SELECT 1") + bind("s2") + execute() + close("s2") + SYNC),
           (2, 1, parse("s2", "SELECT 2") + bind("s2") + execute() + SYNC)])  # fmt: skip


def test_close_then_reuse_the_name() -> None:
    check([
        (1, 0, prepared_statement("s1", "SELECT 1")),
        (1, 0, close("s1") + SYNC),
        (1, 1, run_prepared("s1")),  # gone: the server's own "does not exist"
        (1, 1, prepared_statement("s1", "SELECT 2")),
        (1, 0, run_prepared("s1")),
        (1, 0, close("never-prepared") + SYNC),
    ])  # fmt: skip


# --------------------------------------------------------------------------- errors


def test_duplicate_name_is_postgresql_42p05_and_skips_to_sync() -> None:
    pooled = check([
        (1, 0, prepared_statement("s1", "SELECT 1")),
        (1, 1, parse("s1", "SELECT 2") + bind("s1") + execute() + SYNC),
        (1, 1, run_prepared("s1")),  # still the first statement
        (1, 0, query("BEGIN") + parse("s1", "SELECT 3") + SYNC + query("ROLLBACK")),
    ])  # fmt: skip
    assert pooled.servers[0].backend.tx_status == c.TX_IDLE


def test_a_failed_parse_leaves_no_statement_anywhere() -> None:
    pooled = check([
        (1, 0, parse("s1", "FAIL") + bind("s1") + execute() + SYNC),
        (1, 0, run_prepared("s1")),
        (1, 0, prepared_statement("s1", "SELECT fixed")),  # no 42P05: the failed one is gone
        (1, 1, run_prepared("s1")),
    ])  # fmt: skip
    assert b"PYPOOLER_1" not in pooled.servers[0].statements


def test_an_injected_parse_skipped_after_an_error_is_not_believed() -> None:
    pooled = check([
        (1, 0, prepared_statement("s1", "SELECT 1")),
        # On server 1 the first Bind fails, so the Parse injected for s1 is skipped.
        (1, 1, bind("nope") + execute() + bind("s1") + execute() + SYNC),
        (1, 1, run_prepared("s1")),
    ])  # fmt: skip
    assert b"PYPOOLER_1" in pooled.servers[1].statements
    assert not pooled.servers[1].statements.tentative


def test_errors_in_the_middle_of_a_pipeline() -> None:
    check([
        (1, 0, prepared_statement("a", "SELECT EXECFAIL") + prepared_statement("b", "SELECT b")),
        # Three batches in one write: the middle one fails at Execute.
        (1, 1, run_prepared("b") + run_prepared("a") + run_prepared("b")),
        (2, 1, parse("a", "SELECT b") + bind("a") + execute() + SYNC
         + parse("x", "FAIL") + bind("a") + execute() + SYNC
         + bind("nope") + SYNC + run_prepared("a")),
        (2, 0, close("a") + bind("a") + SYNC + run_prepared("a")),
    ])  # fmt: skip


def test_a_statement_whose_parse_fails_reports_that_error_again_later_in_the_same_pipeline() -> None:
    # A known difference: when x's failing Parse and a later batch using x are sent together,
    # pypooler cannot know yet that the Parse will fail, so the later Bind gets the Parse's error
    # again instead of "does not exist". Both are errors at the same place.
    pooled = Pooled()
    seen = pooled.run(1, 0, parse("x", "FAIL") + SYNC + bind("x") + execute() + SYNC)
    errors = [
        codec.parse_error_fields(body)["M"]
        for msg_type, body in codec.MessageReader().feed(seen)
        if msg_type == c.B_ERROR_RESPONSE
    ]
    assert errors == ["syntax error", "syntax error"]
    assert pooled.run(1, 0, run_prepared("x")) == Direct().run(1, run_prepared("x"))


def test_a_close_skipped_after_an_error_keeps_the_statement() -> None:
    check([
        (1, 0, prepared_statement("s1", "SELECT 1")),
        (1, 0, bind("nope") + close("s1") + SYNC),
        (1, 1, run_prepared("s1")),
    ])  # fmt: skip


def test_failed_transaction_block() -> None:
    check([
        (1, 0, prepared_statement("s1", "SELECT 1")),
        (1, 1, query("BEGIN") + query("FAIL")),
        (1, 1, run_prepared("s1")),  # aborted: the injected Parse fails as the Bind would
        (1, 1, query("ROLLBACK")),
        (1, 1, run_prepared("s1")),
    ])  # fmt: skip


def test_deallocate_all_and_discard_all_forget_the_clients_statements() -> None:
    pooled = check([
        (1, 0, prepared_statement("s1", "SELECT 1")),
        (2, 0, prepared_statement("s2", "SELECT 2")),
        (1, 0, query("DEALLOCATE ALL")),
        (1, 0, run_prepared("s1")),
        (2, 0, run_prepared("s2")),  # the server lost it too: parsed again
        (2, 1, parse("", "DISCARD ALL") + bind() + execute() + SYNC),
        (2, 1, run_prepared("s2")),
    ])  # fmt: skip
    assert len(pooled.clients[1].statements or ()) == 0


# --------------------------------------------------------------------------- the LRU


def test_least_recently_used_statements_are_closed_beyond_the_bound() -> None:
    steps = [(1, 0, prepared_statement(f"s{i}", f"SELECT {i}")) for i in range(5)]
    steps += [(1, 0, run_prepared("s0")), (2, 0, run_prepared("s4"))]
    steps += [(1, 0, run_prepared(f"s{i}")) for i in range(5)]
    pooled = check(steps, capacity=2)
    model = pooled.servers[0].model
    assert len(statement_names(model)) == 2
    assert set(pooled.servers[0].statements.entries) == statement_names(model)


def test_statements_used_in_the_current_transaction_are_not_evicted() -> None:
    steps = [(1, 0, prepared_statement(f"s{i}", f"SELECT {i}")) for i in range(3)]
    body = bind("s0", "p0") + bind("s1", "p1") + bind("s2", "p2")
    steps.append((1, 1, query("BEGIN") + body + execute("p0") + execute("p1") + execute("p2") + SYNC))
    steps.append((1, 1, query("COMMIT")))
    pooled = check(steps, capacity=1)
    # All three were needed at once: the bound is exceeded until the next lend needs room.
    assert len(pooled.servers[1].statements) == 3
    check([*steps, (2, 1, prepared_statement("t", "SELECT t"))], capacity=1)


# --------------------------------------------------------------------------- session state


def test_refused_statements_answer_an_error_and_leave_the_server_consistent() -> None:
    pooled = Pooled(refuse=True)
    seen = pooled.run(1, 0, query("SET statement_timeout = 5"))
    messages = codec.MessageReader().feed(seen)
    assert [t for t, _ in messages] == [c.B_ERROR_RESPONSE, c.B_READY_FOR_QUERY]
    fields = codec.parse_error_fields(messages[0][1])
    assert fields["C"] == "0A000" and "session state (set)" in fields["M"]
    assert pooled.clients[1].session_state == ("set",)
    # Inside a transaction block the server itself fails the transaction, as PostgreSQL would.
    seen = pooled.run(1, 0, query("BEGIN") + parse("", "select pg_advisory_lock(1)") + bind()
                      + execute() + SYNC)  # fmt: skip
    messages = codec.MessageReader().feed(seen)
    assert [t for t, _ in messages] == [c.B_COMMAND_COMPLETE, c.B_READY_FOR_QUERY, c.B_ERROR_RESPONSE,
                                        c.B_READY_FOR_QUERY]  # fmt: skip
    assert messages[-1][1] == b"E"
    pooled.run(1, 0, query("ROLLBACK"))


def test_session_state_is_reported_under_every_policy_but_error() -> None:
    pooled = Pooled()
    data = query("LISTEN x") + parse("s", "CREATE TEMP TABLE t (i int)") + SYNC
    frontend = pooled.frontend(1)
    assert frontend.feed_to(data, pooled.servers[0].statements) != data  # s is tracked
    assert frontend.session_state == ("listen", "temp_table")


# --------------------------------------------------------------------------- reads cut anywhere

SCENARIO: list[Step] = [
    (1, 0, prepared_statement("s1", "SELECT 1") + prepared_statement("s2", "SELECT 2")),
    (2, 0, prepared_statement("s1", "SELECT 2")),
    (1, 1, run_prepared("s1") + bind("s2") + execute() + close("s1") + SYNC),
    (2, 1, parse("s1", "dup") + bind("s1") + SYNC + run_prepared("s1")),
    (1, 0, query("BEGIN") + parse("s3", "SELECT 3") + bind("s3", parameter=b"x" * 300) + execute() + SYNC),
    (1, 0, query("COMMIT")),
]


def test_every_cut_of_the_client_stream_gives_the_same_result() -> None:
    for step in range(len(SCENARIO)):
        data = SCENARIO[step][2]
        for position in range(1, len(data), 3):
            direct = Direct()
            pooled = Pooled(2)
            for index, (cl, sv, dt) in enumerate(SCENARIO):
                expected = direct.run(cl, dt)
                if index == step:
                    frontend = pooled.frontend(cl)
                    shared = pooled.servers[sv]
                    shared.statements.begin_lend()
                    sent = frontend.feed_to(dt[:position], shared.statements)
                    sent += frontend.feed_to(dt[position:], shared.statements)
                    seen = b""
                    for byte in range(len(replies := shared.model.receive(sent))):
                        shared.backend.feed(replies[byte : byte + 1], frontend)
                        replaced = shared.backend.replaced
                        shared.backend.replaced = None
                        seen += replies[byte : byte + 1] if replaced is None else replaced
                    assert seen == expected, (step, position)
                    if shared.backend.tx_status != c.TX_IDLE:
                        pooled.holder[sv] = cl
                    else:
                        pooled.holder.pop(sv, None)
                else:
                    assert pooled.run(cl, sv, dt) == expected


@pytest.mark.parametrize("seed", range(20))
def test_random_cuts_on_both_sides(seed: int) -> None:
    check(SCENARIO, seed=seed)


def test_another_clients_unnamed_statement_is_never_used() -> None:
    """PostgreSQL keeps the unnamed statement until the next Parse, so a shared server may hold
    an earlier client's: a Bind or Describe of the unnamed statement by a client that did not
    parse it is answered as PostgreSQL answers a session that has none, whatever the cuts."""
    uses = [
        bind(parameter=b"x" * 300) + execute() + SYNC,
        describe("") + SYNC,
        bind(portal="p") + execute("p") + SYNC,
        FLUSH + bind() + describe("", "P") + execute() + SYNC,
    ]
    for data in uses:
        expected = ModelServer().receive(data)
        for position in range(1, len(data) + 1, 5):
            pooled = Pooled()
            shared = pooled.servers[0]
            shared.model.statements[b""] = b"SELECT 'an earlier client'\0\0\0"  # left there
            shared.statements.begin_lend()
            frontend = pooled.frontend(1)
            sent = frontend.feed_to(data[:position], shared.statements)
            sent += frontend.feed_to(data[position:], shared.statements)
            replies = shared.model.receive(sent)
            assert not [
                body for msg_type, body in shared.model.received
                if (msg_type == c.F_BIND and body.split(b"\0", 2)[1] == b"") or body == b"S\0"
            ]  # fmt: skip
            shared.backend.feed(replies, frontend)
            assert shared.backend.replaced == expected, (data, position)
            assert frontend.at_rest and not frontend.batches
            # A Parse makes the statement the client's: its uses pass untouched, in that batch
            # and in later ones; another client's are refused again.
            own = parse("", "SELECT 1") + SYNC
            assert frontend.feed_to(own, shared.statements) is own
            assert frontend.feed_to(data, shared.statements) is data
            assert frontend.feed_to(data, shared.statements) is data
            assert pooled.frontend(2).feed_to(data, shared.statements) != data


def test_an_unnamed_parse_first_in_its_batch_makes_the_statement_the_clients_whatever_the_cuts() -> None:
    parse_batch = parse("", "SELECT " + "1 + " * 400 + "1") + SYNC  # longer than the scan window
    use = bind() + execute() + SYNC
    for position in range(1, len(parse_batch)):
        pooled = Pooled()
        statements = pooled.servers[0].statements
        frontend = pooled.frontend(1)
        sent = frontend.feed_to(parse_batch[:position], statements)
        sent += frontend.feed_to(parse_batch[position:], statements)
        assert sent == parse_batch
        assert frontend.feed_to(use, statements) is use, position


def test_an_unnamed_parse_that_an_error_may_skip_counts_only_in_its_batch() -> None:
    pooled = Pooled()
    shared = pooled.servers[0]
    shared.model.statements[b""] = b"SELECT 'an earlier client'\0\0\0"  # left there
    shared.statements.begin_lend()
    frontend = pooled.frontend(1)
    # The Bind of s0 fails, so the server skips the Parse: the unnamed statement is still the
    # earlier client's, and the next batch (pipelined: the same lend) must not reach it.
    first = bind("s0") + parse("", "SELECT 1") + bind() + execute() + SYNC
    second = bind() + execute() + SYNC
    assert frontend.feed_to(first, shared.statements) is first
    sent = frontend.feed_to(second, shared.statements)
    assert sent != second
    shared.backend.feed(shared.model.receive(first + sent), frontend)
    assert replies(shared.backend.replaced or b"") == ["E 26000", "Z I", "E 26000", "Z I"]


# --------------------------------------------------------------------------- fuzzing

NAMES = ["a", "b", "PYPOOLER_1", ""]
TEXTS = ["SELECT 1", "SELECT 2", "FAIL", "SELECT EXECFAIL"]

client_message = st.one_of(
    st.builds(parse, st.sampled_from(NAMES), st.sampled_from(TEXTS)),
    st.builds(bind, st.sampled_from(NAMES)),
    st.builds(describe, st.sampled_from(NAMES)),
    st.just(execute()),
    st.builds(close, st.sampled_from(NAMES)),
    st.just(describe("", "P")),
    st.just(close("", "P")),
    st.just(FLUSH),
)
batch = st.one_of(
    st.lists(client_message, max_size=6).map(lambda messages: b"".join(messages) + SYNC),
    st.sampled_from(["BEGIN", "COMMIT", "ROLLBACK", "FAIL", "SELECT 1", "DEALLOCATE ALL", "DISCARD ALL"]).map(
        query
    ),
)
step = st.tuples(st.integers(1, 3), st.integers(0, 1), batch)


@FUZZ
@given(steps=st.lists(step, min_size=1, max_size=12), capacity=st.integers(1, 3),
       seed=st.integers(0, 1000))  # fmt: skip
def test_fuzz_clients_see_what_a_direct_connection_shows(steps: list[Step], capacity: int, seed: int) -> None:
    check(steps, capacity=capacity, seed=seed)


@FUZZ
@given(steps=st.lists(step, min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_fuzz_statements_are_released_when_nobody_holds_them(steps: list[Step], seed: int) -> None:
    pooled = check(steps, capacity=2, seed=seed)
    for frontend in pooled.clients.values():
        assert frontend.statements is not None
        frontend.statements.clear()
    for shared in pooled.servers:
        shared.statements.clear()
    assert len(pooled.registry) == 0


# --------------------------------------------------------------------------- limits


def test_malformed_or_oversized_messages_are_protocol_violations() -> None:
    pooled = Pooled()
    frontend = pooled.frontend(1)
    with pytest.raises(ProtocolViolation):
        frontend.feed_to(codec.build_message(c.F_PARSE, b"no-terminator"), pooled.servers[0].statements)
    frontend = pooled.frontend(2)
    huge = codec.pack_header(c.F_PARSE, 4 + (17 << 20)) + b"name\0"
    with pytest.raises(ProtocolViolation):
        frontend.feed_to(huge, pooled.servers[0].statements)


def test_placeholder_is_a_close_of_a_statement_nobody_prepares() -> None:
    assert close("PYPOOLER_NONE") == PLACEHOLDER_CLOSE


def both_worlds(steps: list[bytes]) -> tuple[list[list[str]], list[list[str]]]:
    """One client sends `steps` (each one write) on a direct connection and through pypooler."""
    direct, pooled = Direct(), Pooled()
    return (
        [replies(direct.run(1, data)) for data in steps],
        [replies(pooled.run(1, 0, data)) for data in steps],
    )


def test_a_parse_of_a_prepared_text_pipelined_after_an_error_in_a_block_is_answered() -> None:
    # A known difference: pypooler cannot know yet that the block has failed, and the server
    # already has the text, so the Parse is answered ParseComplete; PostgreSQL refuses it. The
    # block is failed either way.
    direct, pooled = both_worlds([
        prepared_statement("s1", "SELECT 1"),
        query("BEGIN"),
        bind("nope") + SYNC + parse("s2", "SELECT 1") + SYNC,
        query("ROLLBACK"),
    ])  # fmt: skip
    assert direct[2] == ["E 26000", "Z E", "E 25P02", "Z E"]
    assert pooled[2] == ["E 26000", "Z E", "1", "Z E"]
    assert pooled[:2] + pooled[3:] == direct[:2] + direct[3:]


def test_deallocate_all_pipelined_into_a_block_that_fails_still_forgets() -> None:
    # A known difference: DEALLOCATE ALL fails in the failed block, so PostgreSQL keeps s1;
    # pypooler, which could not know yet, has forgotten the client's s1.
    direct, pooled = both_worlds([
        prepared_statement("s1", "SELECT 1"),
        query("BEGIN"),
        bind("nope") + SYNC + query("DEALLOCATE ALL"),
        query("ROLLBACK"),
        run_prepared("s1"),
    ])  # fmt: skip
    assert direct[2] == pooled[2] == ["E 26000", "Z E", "E 25P02", "Z E"]
    assert direct[4] == ["2", "C", "Z I"]
    assert pooled[4] == ["E 26000", "Z I"]


# --------------------------------------------------------------------------- schema changes


def test_a_schema_change_sent_through_the_stream_retires_shared_statements() -> None:
    pooled = Pooled(servers=1)
    pooled.run(1, 0, prepared_statement("s1", "SELECT col FROM t"))
    before = pooled.clients[1].statements.names[b"s1"]  # type: ignore[union-attr]
    pooled.run(2, 0, query("ALTER TABLE t ADD b int"))
    pooled.run(3, 0, prepared_statement("s1", "SELECT col FROM t"))
    after = pooled.clients[3].statements.names[b"s1"]  # type: ignore[union-attr]
    assert after is not before
    parses = [body for msg_type, body in pooled.servers[0].model.received if msg_type == c.F_PARSE]
    assert parses[-1].startswith(after.name + b"\0")  # really parsed, not mapped onto the old one


@pytest.mark.parametrize("cut", [None, 3, 11, 40])
def test_a_stale_plan_error_from_the_server_moves_the_schema_version_on(cut: int | None) -> None:
    schema = SchemaVersion()
    backend = RewritingBackend(schema=schema)
    frontend = RewritingFrontend(None)
    frontend.feed_to(query("SELECT * FROM t"), None)
    error = errors.build_error_response("ERROR", "0A000", "cached plan must not change result type")
    data = error + codec.READY_FOR_QUERY_IDLE
    parts = [data] if cut is None else [data[:cut], data[cut:]]
    forwarded = b""
    for part in parts:
        backend.feed(part, frontend)
        forwarded += part if backend.replaced is None else backend.replaced
        backend.replaced = None
    assert forwarded == data  # the client gets the error as PostgreSQL sent it
    assert schema.number == 1
