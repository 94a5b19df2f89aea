"""advise_pool with made-up inputs: the verdicts in the seed's order, and a bigger pool advised
only when the pool is genuinely too small."""

from __future__ import annotations

from typing import Any

import pytest

from pypooler.activity import ServerLimits
from pypooler.advisor import (
    FLEET_OVER_MAX_CONNECTIONS,
    IDLE_IN_TRANSACTION_VERDICT,
    IDLE_SESSION,
    LOCK_WAIT_VERDICT,
    OK,
    POOL_TOO_SMALL,
    SERVER_FULL,
    SLOW_STATEMENT,
    PoolAdvice,
    StatementFigures,
    advise_pool,
)
from pypooler.holders import (
    IDLE,
    IDLE_IN_TRANSACTION,
    LOCK_WAIT,
    RUNNING,
    Blocker,
    HolderDiagnosis,
    HolderView,
)
from pypooler.stats import Histogram, TrafficStats

MS = 1_000_000
LIMITS = ServerLimits(max_connections=100, reserved_connections=3)
RAISE = "raise pool_size"


def window(
    holds_ms: list[float], *, waits_ms: tuple[float, ...] = (), idle_ms: tuple[float, ...] = ()
) -> TrafficStats:
    """Finished holds (one request each), their non-zero checkout waits and idle times."""
    stats = TrafficStats()
    stats.single.pending.extend(int(ms * MS) for ms in holds_ms)
    stats.wait_nonzero.pending.extend(int(ms * MS) for ms in waits_ms)
    stats.idle_nonzero.pending.extend(int(ms * MS) for ms in idle_ms)
    return stats


def holder(
    pid: int, state: str, *, app: str = "api", held_s: float = 5.0, blocker: Blocker | None = None
) -> HolderDiagnosis:
    idle_s = held_s if state in (IDLE_IN_TRANSACTION, IDLE) else 0.0
    in_transaction = state == IDLE_IN_TRANSACTION
    view = HolderView(
        database="app", user="app", application_name=app, client_addr=f"10.1.0.{pid}:5000",
        server_pid=pid, server_address=("db", 5432), held_s=held_s, idle_s=idle_s,
        in_transaction=in_transaction, idle_total_s=idle_s if in_transaction else 0.0,
        statement="select * from orders where id = 42", since_ns=0,
    )  # fmt: skip
    return HolderDiagnosis(view, state, "Lock:tuple" if state == LOCK_WAIT else "", blocker, True)


def advise(stats: TrafficStats, **overrides: Any) -> PoolAdvice:
    arguments: dict[str, Any] = {
        "window": stats, "window_s": 10.0, "apps": {"api": stats}, "holders": [], "long_s": 1.0,
        "pool_size": 10, "server_limits": LIMITS, "bound_x_instances": 10, "expected_instances": 1,
        "server": "db:5432",
    }  # fmt: skip
    arguments.update(overrides)
    return advise_pool("app", "app", **arguments)


def text(advice: PoolAdvice) -> str:
    return " | ".join([*(v.text for v in advice.verdicts), *advice.notes])


# Clients queue: 50,000 holds of 2 ms in 10 s (10 servers busy), each after a 0.2 ms wait (one more
# wanted).
BUSY_SHORT = window([2.0] * 50_000, waits_ms=(0.2,) * 50_000)


def test_a_quiet_pool_is_ok_and_its_rate_reads_as_its_column() -> None:
    advice = advise(window([1.0, 2.0, 3.0]))
    assert (advice.verdict.category, advice.verdict.culprit) == (OK, None)
    assert advice.xact_per_s == pytest.approx(0.3)
    assert "0.3 xact/s" in advice.verdict.text  # not "0 xact/s" beside 0.3 in its own column


def test_a_pool_genuinely_too_small_is_told_to_grow_within_the_servers_room() -> None:
    advice = advise(BUSY_SHORT)
    assert advice.connections_busy == pytest.approx(10.0)
    assert (advice.verdict.category, advice.verdict.culprit) == (POOL_TOO_SMALL, "app/app")
    assert "raise pool_size to ~14" in advice.verdict.text  # (10 busy + 1 waiting) x 1.25, rounded up
    capped = advise(BUSY_SHORT, server_limits=ServerLimits(15, 3))
    assert "raise pool_size to ~12 (the most max_connections leaves room for: 12)" in capped.verdict.text
    unknown = advise(BUSY_SHORT, server_limits=None)
    assert unknown.verdict.category == POOL_TOO_SMALL and "if the server has room" in unknown.verdict.text


def test_no_bigger_pool_when_the_server_has_no_room() -> None:
    advice = advise(BUSY_SHORT, server_limits=ServerLimits(13, 3))
    assert advice.verdict.category == SERVER_FULL and RAISE not in text(advice)
    fleet = advise(BUSY_SHORT, bound_x_instances=120, expected_instances=12)
    assert [v.category for v in fleet.verdicts] == [SERVER_FULL, FLEET_OVER_MAX_CONNECTIONS]
    assert RAISE not in text(fleet)


def test_no_bigger_pool_without_queueing_or_busy_servers() -> None:
    assert advise(window([2.0] * 50_000)).verdict.category == OK  # busy but nobody waits
    assert advise(window([2.0] * 100, waits_ms=(20.0,) * 100)).verdict.category == OK  # waits, idle servers


def test_the_issues_lock_stall_names_the_idle_holder_and_never_a_bigger_pool() -> None:
    # One client idle in its transaction for 30 s holding a row lock, eight queued behind it,
    # nothing finished in the window: once "raise pool_size to ~11".
    stuck = holder(1, IDLE_IN_TRANSACTION, app="stuck-worker", held_s=30.0)
    root = Blocker(1, stuck.holder, None)
    victims = [holder(10 + i, LOCK_WAIT, app="pgbench", held_s=29.0, blocker=root) for i in range(8)]
    advice = advise(window([]), window_s=30.0, holders=[stuck, *victims], oldest_wait_s=25.0, waiting_now=3)
    assert [v.category for v in advice.verdicts] == [IDLE_IN_TRANSACTION_VERDICT, LOCK_WAIT_VERDICT]
    assert advice.verdict.culprit is not None and advice.verdict.culprit.startswith("app=stuck-worker ")
    assert "8 client(s) wait on its locks" in advice.verdict.text
    assert advice.verdicts[1].culprit == advice.verdict.culprit  # the root, not a victim
    assert advice.top_idle_application == "stuck-worker" and advice.holding_now == 9
    assert advice.connections_busy == pytest.approx((30 + 8 * 29) / 30)
    assert RAISE not in text(advice)


def test_a_lock_chain_rooted_outside_the_pool_is_the_first_verdict() -> None:
    root = Blocker(77, None, None)
    victims = [holder(10 + i, LOCK_WAIT, blocker=root) for i in range(3)]
    advice = advise(BUSY_SHORT, holders=victims)
    assert advice.verdict.category == LOCK_WAIT_VERDICT and "backend pid 77" in (advice.verdict.culprit or "")
    assert "3 client(s) wait on a lock" in advice.verdict.text and RAISE not in text(advice)


def test_idle_in_transaction_from_the_window_names_the_application() -> None:
    stats = window([500.0] * 10, waits_ms=(300.0,) * 10, idle_ms=(450.0,) * 10)
    advice = advise(stats, apps={"checkout": stats})
    assert (advice.verdict.category, advice.verdict.culprit) == (IDLE_IN_TRANSACTION_VERDICT, "app=checkout")
    assert advice.idle_share == pytest.approx(0.9)


def test_session_holds_idle_while_others_wait() -> None:
    idle = [holder(i, IDLE, app="django", held_s=60.0) for i in range(10)]
    advice = advise(window([1.0] * 10), holders=idle, waiting_now=5, oldest_wait_s=2.0)
    assert advice.verdict.category == IDLE_SESSION and (advice.verdict.culprit or "").startswith(
        "app=django "
    )
    assert RAISE not in text(advice)


def test_a_slow_statement_is_named_against_the_usual_hold() -> None:
    stats = window([1.0] * 900 + [400.0] * 100, waits_ms=(50.0,) * 1000)
    statements = [StatementFigures("select * from ledger where account = ?", 100, 40.0),
                  StatementFigures("select ?", 900, 0.9)]  # fmt: skip
    advice = advise(stats, statements=statements, pool_size=4, window_s=11.0)
    assert advice.verdict.category == SLOW_STATEMENT
    assert advice.verdict.culprit == "select * from ledger where account = ?"
    assert "400.0 ms on average" in advice.verdict.text and RAISE not in text(advice)


def test_a_statement_running_long_now_is_named() -> None:
    running = [holder(5, RUNNING, held_s=12.0)]
    advice = advise(BUSY_SHORT, holders=running)
    assert (advice.verdict.category, advice.verdict.culprit) == (
        SLOW_STATEMENT,
        "select * from orders where id = ?",
    )


def test_no_bigger_pool_when_hold_time_is_what_grew() -> None:
    before = Histogram()
    before.pending.extend([2 * MS] * 1000)
    grown = window([30.0] * 5000, waits_ms=(50.0,) * 5000)
    advice = advise(grown, hold_before=before, statements=[StatementFigures("select ?", 6000, 152.0)])
    assert advice.verdict.category == SLOW_STATEMENT and "hold time grew" in advice.verdict.text
    assert RAISE not in text(advice)
    long = advise(window([200.0] * 600, waits_ms=(50.0,) * 600), window_s=12.0)
    assert long.verdict.category == SLOW_STATEMENT and "holds are long" in long.verdict.text
    assert RAISE not in text(long)


def test_the_fleet_over_max_connections() -> None:
    advice = advise(window([1.0]), bound_x_instances=200, expected_instances=10)
    assert (advice.verdict.category, advice.verdict.culprit) == (FLEET_OVER_MAX_CONNECTIONS, "db:5432")
    assert "to 9 per instance" in advice.verdict.text  # 97 // 10
    assert advise(window([1.0])).notes == ["capacity ok: 10 of 97 server connections at most"]


def test_short_lived_clients_are_noted() -> None:
    stats = window([1.0] * 40)
    stats.login.pending.extend([5 * MS] * 40)
    advice = advise(stats)
    assert advice.verdict.category == OK
    assert any(
        note.startswith("short-lived clients: 40 logins (4.0/s), 1.0 transactions each")
        for note in advice.notes
    )
