"""Statement attribution past the exact budget: sampled, weighted, unbiased."""

from __future__ import annotations

import pypooler.stats
from pypooler.stats import STATEMENT_ALWAYS_NS, STATEMENT_EXACT_PER_SECOND, PoolStats, fingerprint

SHORT_NS = 200_000


def end_transaction(stats: PoolStats, statement: bytes, held: int) -> None:
    """What ClientConnection.server_ready_for_query does with a transaction's statement."""
    budget = stats.statement_budget = stats.statement_budget - 1
    if budget >= 0:
        stats.account_statement(statement, held, 0, 1)
    elif held >= STATEMENT_ALWAYS_NS:
        stats.account_long(statement, held, 0)
    elif budget <= stats.sample_at:
        stats.account_sample(statement, held, 0)


def counts(stats: PoolStats) -> dict[str, int]:
    return {name: s.count for name, s in stats.statements.items()}


def test_the_first_transactions_of_each_second_are_counted_exactly() -> None:
    stats = PoolStats()
    for i in range(STATEMENT_EXACT_PER_SECOND):
        end_transaction(stats, b"select %d" % i, SHORT_NS)
    assert counts(stats) == {"select ?": STATEMENT_EXACT_PER_SECOND}
    stats.new_pass(stats.started_ns + 500_000_000)  # a pass within the same second: no refill
    assert stats.statement_budget == 0
    stats.new_pass(stats.started_ns + 1_000_000_000)
    end_transaction(stats, b"select 1", SHORT_NS)
    assert counts(stats) == {"select ?": STATEMENT_EXACT_PER_SECOND + 1}


def test_samples_stand_for_every_transaction_since_the_previous_one() -> None:
    pypooler.stats._sampling.seed(7)
    stats = PoolStats()
    total = 50_000
    for i in range(total):
        end_transaction(stats, b"select %d" % i, SHORT_NS)
    # Exact: everything up to the last sample; the transactions after it are not counted yet.
    counted = counts(stats)["select ?"]
    assert counted == STATEMENT_EXACT_PER_SECOND + stats.sampled_since * -1
    assert total - counted < 2 * 64


def test_a_rotation_of_statements_is_not_aliased_by_the_sampling() -> None:
    pypooler.stats._sampling.seed(11)
    stats = PoolStats()
    # A period that divides the mean gap: a fixed gap would sample only one of them.
    rotation = [b"select a from t where id = %d", b"update t set a = %d", b"delete from u where id = %d",
                b"insert into v values (%d)"]  # fmt: skip
    total = 64_000
    for i in range(total):
        end_transaction(stats, rotation[i % len(rotation)] % i, SHORT_NS)
    per_statement = counts(stats)
    assert len(per_statement) == 4
    for count in per_statement.values():  # about 250 samples each: within 3 standard deviations
        assert abs(count - total / 4) < 0.25 * total / 4


def test_long_holds_are_counted_once_past_the_budget() -> None:
    pypooler.stats._sampling.seed(3)
    stats = PoolStats()
    for i in range(STATEMENT_EXACT_PER_SECOND):
        end_transaction(stats, b"select %d" % i, SHORT_NS)
    long_ones = 0
    for i in range(20_000):
        if i % 100 == 0:
            end_transaction(stats, b"select pg_sleep(%d)" % i, STATEMENT_ALWAYS_NS)
            long_ones += 1
        else:
            end_transaction(stats, b"select %d" % i, SHORT_NS)
    per_statement = counts(stats)
    assert per_statement["select pg_sleep(?)"] == long_ones
    short_ones = STATEMENT_EXACT_PER_SECOND + 20_000 - long_ones
    assert short_ones - 2 * 64 < per_statement["select ?"] <= short_ones


def test_fingerprint_strips_literals() -> None:
    assert fingerprint(b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;") == (
        "SELECT abalance FROM pgbench_accounts WHERE aid = ?;"
    )
    assert fingerprint(b"select * from t1 where a in (1, 2, 3) and b = 'x'") == (
        "select * from t1 where a in (...) and b = ?"
    )


def test_a_parse_text_noted_with_its_terminator_fingerprints_as_the_text() -> None:
    # The rewriting tracker notes an unnamed Parse's text up to the message's last byte.
    assert fingerprint(b"select n from t where id = $1\x00\x00") == "select n from t where id = ?"
