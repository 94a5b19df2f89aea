"""What the clients holding servers right now are doing: the pool's view joined with PostgreSQL's.

The pool knows, per holder, how long it has held its server, whether the server is working or
has answered and waits on the client (idle, in a transaction or not), and the last statement.
Only PostgreSQL knows whether a working backend runs or waits on a lock, and whose lock:
`pg_stat_activity` and `pg_blocking_pids`. This module is pure: it writes the question
(`activity_query`), reads the answer (`parse_activity`) and classifies each holder (`classify`)
into a small vocabulary, `HOLDER_STATES`; for a lock wait it names the backend at the root of
the chain and, when that backend is one of our servers, the client holding it. The asking
(connections, time bounds) is activity.py's, the verdicts advisor.py's.

Rules:
- The pool's own view wins where it knows: a server that answered and waits on its client is
  idle, whatever an older answer from PostgreSQL said.
- An answer counts for a holder only if it was taken after the holder's current request began
  (`HolderView.since_ns`): a lock wait seen during an earlier statement says nothing now.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pypooler.stats import NS_PER_S

if TYPE_CHECKING:
    from pypooler.pool import Holder, Pool

# The states a holder is classified in (SHOW HOLDERS' `diagnosis`, pypooler_holders{state}).
RUNNING: Final = "running"  # the server works for it (or PostgreSQL was not asked yet)
LOCK_WAIT: Final = "lock_wait"  # its backend waits on a lock another backend holds
IDLE_IN_TRANSACTION: Final = "idle_in_transaction"  # the server waits on the client, mid-transaction
IDLE: Final = "idle"  # session mode: held between transactions
HOLDER_STATES: Final = (RUNNING, LOCK_WAIT, IDLE_IN_TRANSACTION, IDLE)

STATEMENT_CHARS: Final = 200  # of a query, asked of PostgreSQL and shown
CHAIN_DEPTH: Final = 4  # blockers of blockers followed in the question (a chain is rarely deeper)
CULPRIT_STATEMENT_CHARS: Final = 80  # of a statement in a one-line description


@dataclass(frozen=True, slots=True)
class HolderView:
    """One client holding a server, as the pool sees it at one moment."""

    database: str
    user: str
    application_name: str
    client_addr: str
    server_pid: int
    server_address: tuple[str, int]
    held_s: float
    idle_s: float  # since the server answered and began waiting on the client; 0 while it works
    in_transaction: bool  # that wait is inside a transaction
    idle_total_s: float  # idle-in-transaction time of this hold so far, the current stretch included
    statement: str  # the last statement the client sent
    since_ns: int  # when its current request (or the hold) began


def view_of(pool: Pool, client: Holder, now_ns: int) -> HolderView:
    """What the pool knows of a holder (read on the event loop, so consistent)."""
    server = client.server
    idle_ns = now_ns - client.idle_since_ns if client.idle_since_ns else 0
    in_transaction = bool(client.idle_since_ns) and client.idle_in_xact
    idle_total_ns = client.idle_ns + (idle_ns if in_transaction else 0)
    return HolderView(
        database=pool.database,
        user=pool.user,
        application_name=client.application_name,
        client_addr=client.peer,
        server_pid=server.process_id if server is not None else 0,
        server_address=server.address if server is not None else ("", 0),
        held_s=(now_ns - client.lent_ns) / NS_PER_S,
        idle_s=idle_ns / NS_PER_S,
        in_transaction=in_transaction,
        idle_total_s=idle_total_ns / NS_PER_S,
        statement=statement_text(client.frontend.last_statement),
        since_ns=client.query_start_ns or client.lent_ns,
    )


def statement_text(raw: bytes) -> str:
    """A statement as the trackers noted it, for people: up to its first NUL (a Parse's text
    may be noted with its terminator and parameter count), at most STATEMENT_CHARS."""
    return raw.split(b"\0", 1)[0][:STATEMENT_CHARS].decode("utf-8", "replace")


def long_holders(pool: Pool, now_ns: int, threshold_ns: float) -> list[Holder]:
    """The pool's holders that have held their server `threshold_ns` or longer (0: none)."""
    if not threshold_ns:
        return []
    return [client for client in pool.holders(now_ns) if now_ns - client.lent_ns >= threshold_ns]


# --------------------------------------------------------------------------- PostgreSQL's view


@dataclass(frozen=True, slots=True)
class BackendActivity:
    """One row of pg_stat_activity (fields PostgreSQL hides from other roles come back empty)."""

    pid: int
    state: str  # active, idle in transaction, ...
    wait_event_type: str
    wait_event: str
    query: str
    xact_s: float | None  # since the transaction began
    state_s: float | None  # since `state` last changed
    blocking_pids: tuple[int, ...]
    application_name: str
    client_addr: str
    user: str

    @property
    def wait(self) -> str:
        return f"{self.wait_event_type}:{self.wait_event}" if self.wait_event_type else ""


@dataclass(frozen=True, slots=True)
class ActivityReport:
    """One answer from one PostgreSQL server: its rows by backend pid, and when it was taken."""

    address: tuple[str, int]
    taken_ns: int
    rows: dict[int, BackendActivity]


def activity_query(pids: Iterable[int]) -> str:
    """The question for a set of backend pids: their rows, and those of the backends that block
    them (and block those, CHAIN_DEPTH deep), each with its own blocking pids. Pids are ints,
    so writing them into the text is safe; a simple Query needs no extended protocol."""
    listed = ",".join(str(int(pid)) for pid in sorted(set(pids)))
    return (
        "with recursive chain(pid, blockers, depth) as ("
        f" select p, pg_blocking_pids(p), 0 from unnest('{{{listed}}}'::int[]) as p"
        " union all"
        " select b, pg_blocking_pids(b), depth + 1 from chain, unnest(chain.blockers) as b"
        f" where depth < {CHAIN_DEPTH})"
        " select distinct on (a.pid) a.pid, a.state, a.wait_event_type, a.wait_event,"
        f" left(a.query, {STATEMENT_CHARS}), extract(epoch from now() - a.xact_start),"
        " extract(epoch from now() - a.state_change), chain.blockers, a.application_name,"
        " host(a.client_addr), a.usename"
        " from chain join pg_stat_activity a using (pid) order by a.pid, chain.depth"
    )


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


def _seconds(value: bytes | None) -> float | None:
    return float(value) if value else None


def _int_array(value: bytes | None) -> tuple[int, ...]:
    """An int[] in PostgreSQL's text form: '{12,34}', '{}'."""
    inner = _text(value).strip("{}")
    return tuple(int(item) for item in inner.split(",")) if inner else ()


def parse_activity(rows: list[list[bytes | None]]) -> dict[int, BackendActivity]:
    """The rows of `activity_query`'s answer, by pid."""
    found = {}
    for row in rows:
        pid, state, wait_type, wait, query, xact_s, state_s, blockers, app, addr, user = row
        if pid is None:
            continue
        found[int(pid)] = BackendActivity(
            pid=int(pid), state=_text(state), wait_event_type=_text(wait_type), wait_event=_text(wait),
            query=_text(query), xact_s=_seconds(xact_s), state_s=_seconds(state_s),
            blocking_pids=_int_array(blockers), application_name=_text(app), client_addr=_text(addr),
            user=_text(user),
        )  # fmt: skip
    return found


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True, slots=True)
class Blocker:
    """The backend at the root of a lock chain: one of our servers (`holder` set) or not."""

    pid: int
    holder: HolderView | None
    activity: BackendActivity | None

    @property
    def application_name(self) -> str:
        if self.holder is not None:
            return self.holder.application_name
        return self.activity.application_name if self.activity is not None else ""

    def describe(self) -> str:
        """One line naming it: who, where, for how long, doing what."""
        if self.holder is not None:
            return describe_view(self.holder)
        activity = self.activity
        if activity is None:
            return f"backend pid {self.pid} (not lent by this pypooler; hidden from this user)"
        since = f" for {activity.state_s:.1f} s" if activity.state_s is not None else ""
        address = activity.client_addr or "local"
        return (
            f"backend pid {self.pid} (not lent by this pypooler) app={activity.application_name or '-'}"
            f" {activity.user}@{address}, {activity.state or 'state hidden'}{since},"
            f" query: {activity.query[:CULPRIT_STATEMENT_CHARS]!r}"
        )


def describe_view(view: HolderView) -> str:
    """A holder in one line, for a culprit column or a log line."""
    if view.idle_s and view.in_transaction:
        state = f"idle in transaction {view.idle_s:.1f} s"
    elif view.idle_s:
        state = f"idle {view.idle_s:.1f} s"
    else:
        state = "working"
    return (
        f"app={view.application_name or '-'} {view.client_addr} (server pid {view.server_pid}),"
        f" held {view.held_s:.1f} s, {state}, last statement: {view.statement[:CULPRIT_STATEMENT_CHARS]!r}"
    )


@dataclass(frozen=True, slots=True)
class HolderDiagnosis:
    """One holder classified: its state, and for a lock wait the root of its chain."""

    holder: HolderView
    state: str  # one of HOLDER_STATES
    wait: str  # "Lock:transactionid", or "" when not known or not waiting
    blocker: Blocker | None
    asked: bool  # PostgreSQL's answer (taken during its current request) was used

    @property
    def statement(self) -> str:
        return self.holder.statement


def classify(view: HolderView, report: ActivityReport | None, ours: dict[int, HolderView]) -> HolderDiagnosis:
    """Classify one holder from the pool's view and, if fresh enough, PostgreSQL's answer about
    its server's address; `ours` maps backend pids of our servers (there) to their holders."""
    if view.idle_s:  # the server answered: whatever it holds, it waits on the client
        return HolderDiagnosis(view, IDLE_IN_TRANSACTION if view.in_transaction else IDLE, "", None, False)
    if report is None or report.taken_ns < view.since_ns or report.address != view.server_address:
        return HolderDiagnosis(view, RUNNING, "", None, False)
    activity = report.rows.get(view.server_pid)
    if activity is None:
        return HolderDiagnosis(view, RUNNING, "", None, False)
    if not activity.blocking_pids:
        return HolderDiagnosis(view, RUNNING, activity.wait, None, True)
    root = root_blocker(view.server_pid, report.rows)
    blocker = Blocker(root, ours.get(root), report.rows.get(root))
    return HolderDiagnosis(view, LOCK_WAIT, activity.wait, blocker, True)


def root_blocker(pid: int, rows: dict[int, BackendActivity]) -> int:
    """Follow the first blocking pid until a backend that waits on nobody (or one the answer
    does not cover, or a cycle: a deadlock PostgreSQL is about to break)."""
    seen = {pid}
    current = pid
    while True:
        activity = rows.get(current)
        if activity is None or not activity.blocking_pids:
            return current
        following = activity.blocking_pids[0]
        if following in seen:
            return current
        seen.add(following)
        current = following


def diagnose_all(
    pools: Iterable[Pool], reports: dict[tuple[str, int], ActivityReport], now_ns: int
) -> list[HolderDiagnosis]:
    """Every holder of these pools, classified (all of them: a lock's root may be any)."""
    return classify_all(
        [view_of(pool, client, now_ns) for pool in pools for client in pool.holders(now_ns)], reports
    )


def classify_all(
    views: list[HolderView], reports: dict[tuple[str, int], ActivityReport]
) -> list[HolderDiagnosis]:
    """Every holder classified, with each server's latest answer."""
    ours: dict[tuple[str, int], dict[int, HolderView]] = {}
    for view in views:
        ours.setdefault(view.server_address, {})[view.server_pid] = view
    return [
        classify(view, reports.get(view.server_address), ours.get(view.server_address, {})) for view in views
    ]
