"""holders.py: PostgreSQL's answer read, and each holder classified from it and the pool's view."""

from __future__ import annotations

from dataclasses import replace

from pypooler.holders import (
    IDLE,
    IDLE_IN_TRANSACTION,
    LOCK_WAIT,
    RUNNING,
    ActivityReport,
    BackendActivity,
    Blocker,
    HolderView,
    activity_query,
    classify,
    classify_all,
    parse_activity,
    root_blocker,
    statement_text,
)

ADDRESS = ("10.0.0.5", 5432)
NOW = 1_000_000_000_000


def view(pid: int, app: str = "api", *, idle_s: float = 0.0, in_transaction: bool = False) -> HolderView:
    return HolderView(
        database="app", user="app", application_name=app, client_addr=f"10.1.0.{pid % 250}:5000",
        server_pid=pid, server_address=ADDRESS, held_s=5.0, idle_s=idle_s, in_transaction=in_transaction,
        idle_total_s=idle_s if in_transaction else 0.0, statement="update t set n = n + 1 where id = 1",
        since_ns=NOW - 5_000_000_000,
    )  # fmt: skip


def activity(pid: int, *blockers: int, state: str = "active", app: str = "") -> BackendActivity:
    return BackendActivity(
        pid=pid, state=state, wait_event_type="Lock" if blockers else "",
        wait_event="tuple" if blockers else "", query="select 1", xact_s=3.0, state_s=2.0,
        blocking_pids=blockers, application_name=app, client_addr="10.2.0.1", user="app",
    )  # fmt: skip


def report(*rows: BackendActivity, taken_ns: int = NOW) -> ActivityReport:
    return ActivityReport(ADDRESS, taken_ns, {row.pid: row for row in rows})


def test_the_answer_is_read_row_by_row() -> None:
    rows: list[list[bytes | None]] = [
        [b"101", b"active", b"Lock", b"transactionid", b"update t ...", b"4.5", b"4.5", b"{100}", b"pgbench",
         b"127.0.0.1", b"app"],
        [b"100", b"idle in transaction", None, None, b"select ... for update", b"6.25", b"6.0", b"{}",
         b"worker", None, b"app"],
    ]  # fmt: skip
    found = parse_activity(rows)
    assert found[101].blocking_pids == (100,) and found[101].wait == "Lock:transactionid"
    assert found[100].blocking_pids == () and found[100].wait == "" and found[100].client_addr == ""
    assert found[100].xact_s == 6.25 and found[100].state == "idle in transaction"


def test_the_question_names_each_pid_once() -> None:
    sql = activity_query([7, 3, 7])
    assert "'{3,7}'::int[]" in sql and "pg_blocking_pids" in sql and "pg_stat_activity" in sql


def test_the_pools_view_wins_where_it_knows() -> None:
    # An answer taken while it ran a statement says nothing once the server waits on the client.
    stale = report(activity(100, 99))
    assert classify(view(100, idle_s=1.0, in_transaction=True), stale, {}).state == IDLE_IN_TRANSACTION
    assert classify(view(100, idle_s=1.0), stale, {}).state == IDLE  # session mode, between transactions


def test_an_answer_older_than_the_request_or_from_another_server_is_not_used() -> None:
    holder = view(100)
    older = report(activity(100, 99), taken_ns=holder.since_ns - 1)
    assert classify(holder, older, {}).state == RUNNING and not classify(holder, older, {}).asked
    elsewhere = replace(report(activity(100, 99)), address=("10.0.0.6", 5432))
    assert classify(holder, elsewhere, {}).state == RUNNING
    assert classify(holder, None, {}).state == RUNNING


def test_a_lock_wait_names_the_root_of_its_chain_and_our_client_holding_it() -> None:
    root = view(100, "stuck-worker", idle_s=9.0, in_transaction=True)
    answer = report(activity(102, 101), activity(101, 100), activity(100, state="idle in transaction"))
    found = classify(view(102, "pgbench"), answer, {100: root, 102: view(102, "pgbench")})
    assert found.state == LOCK_WAIT and found.wait == "Lock:tuple" and found.asked
    assert found.blocker is not None and found.blocker.pid == 100 and found.blocker.holder is root
    assert found.blocker.describe().startswith("app=stuck-worker 10.1.0.100:5000 (server pid 100)")
    assert "idle in transaction 9.0 s" in found.blocker.describe()


def test_a_root_that_is_not_ours_is_described_from_postgresql() -> None:
    answer = report(activity(102, 55), activity(55, state="idle in transaction", app="psql"))
    found = classify(view(102), answer, {})
    assert found.blocker is not None and found.blocker.holder is None
    described = found.blocker.describe()
    assert "backend pid 55 (not lent by this pypooler) app=psql app@10.2.0.1" in described
    assert "idle in transaction for 2.0 s" in described
    hidden = Blocker(77, None, None).describe()
    assert "backend pid 77" in hidden and "hidden" in hidden


def test_the_root_of_a_cycle_or_an_unanswered_blocker_ends_the_walk() -> None:
    rows = {1: activity(1, 2), 2: activity(2, 1)}
    assert root_blocker(1, rows) == 2
    assert root_blocker(1, {1: activity(1, 9)}) == 9  # 9 is not in the answer: taken as the root


def test_classify_all_finds_roots_among_every_holder() -> None:
    views = [view(100, "stuck", idle_s=3.0, in_transaction=True), view(101, "victim")]
    answer = report(activity(101, 100), activity(100, state="idle in transaction"))
    found = classify_all(views, {ADDRESS: answer})
    assert [d.state for d in found] == [IDLE_IN_TRANSACTION, LOCK_WAIT]
    assert found[1].blocker is not None and found[1].blocker.application_name == "stuck"


def test_statements_are_shown_up_to_their_first_nul() -> None:
    assert statement_text(b"select n from t where id = $1\x00\x00") == "select n from t where id = $1"
    assert len(statement_text(b"x" * 1000)) == 200
