"""Counters and histograms fed by connection events; the source for logs, the console and metrics.

Hot-path rules:
- An event costs attribute increments and, for a duration, one `bisect` into preallocated bucket
  bounds. Nothing here formats text, builds labels, takes a lock or allocates per event.
- Stats are kept per (pool, application_name) in a `TrafficStats`; pool totals are merged when
  someone reads them, so each event updates exactly one object.
- Cardinality is bounded: the first `max_applications` names a pool sees get their own
  `TrafficStats`, later ones share `OTHER`; statement fingerprints likewise (`max_statements`).

Readers (admin console, Prometheus collector, advisor) work from cumulative totals; rates and
windowed percentiles come from differences between periodic `Snapshot`s.
"""

from __future__ import annotations

import random
import re
import time
from bisect import bisect_left
from collections import Counter
from itertools import repeat
from typing import Final

# Histogram bucket upper bounds in seconds, 100 µs to 60 s (the range); one more
# bucket catches everything above.
BUCKET_BOUNDS_S: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BOUNDS_NS: Final = [int(b * 1e9) for b in BUCKET_BOUNDS_S]


def bucket_of(ns: int) -> int:
    return bisect_left(BOUNDS_NS, ns)


OTHER: Final = "other"
NO_MIN_NS: Final = 1 << 62  # Histogram._min_ns before anything is observed (about 146 years)


class Histogram:
    """Cumulative duration histogram with fixed buckets; durations in nanoseconds.

    The hot path only appends a duration to `pending` (one list append: no bucket search, no new
    count or sum objects per event); `settle` folds pending durations into the buckets in bulk,
    in C (map, Counter, sum, min, max), when the histogram is read and at every maintenance pass,
    which bounds `pending` to about a second of events. `count` is summed when read.

    The smallest and largest duration observed are kept (in `settle`, off the hot path), so a
    quantile is never reported outside what was seen: one 30 s statement is p50 = p99 = 30 s,
    not the middle of its 30-60 s bucket. A window (`minus`) keeps the cumulative extremes as
    its bounds, exact when the window holds a new extreme.
    """

    __slots__ = ("_counts", "_max_ns", "_min_ns", "_sum_ns", "pending")

    def __init__(self) -> None:
        self._counts = [0] * (len(BOUNDS_NS) + 1)
        self._sum_ns = 0
        self._min_ns = NO_MIN_NS
        self._max_ns = 0
        self.pending: list[int] = []

    def settle(self) -> None:
        pending = self.pending
        if pending:
            self.pending = []
            counts = self._counts
            for index, n in Counter(map(bisect_left, repeat(BOUNDS_NS), pending)).items():
                counts[index] += n
            self._sum_ns += sum(pending)
            self._min_ns = min(self._min_ns, min(pending))
            self._max_ns = max(self._max_ns, max(pending))

    @property
    def counts(self) -> list[int]:
        self.settle()
        return self._counts

    @property
    def sum_ns(self) -> int:
        self.settle()
        return self._sum_ns

    @property
    def min_ns(self) -> int:
        """The smallest duration observed (0 when none was)."""
        self.settle()
        return self._min_ns if self._min_ns != NO_MIN_NS else 0

    @property
    def max_ns(self) -> int:
        self.settle()
        return self._max_ns

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, ns: int) -> None:
        self._counts[bisect_left(BOUNDS_NS, ns)] += 1
        self._sum_ns += ns
        # _extend, inline: this runs once per multi-request transaction that waited on its client.
        if ns < self._min_ns:
            self._min_ns = ns
        if ns > self._max_ns:
            self._max_ns = ns

    def observe_weighted(self, index: int, ns: int, weight: int) -> None:
        """`weight` observations of `ns` (a sample standing for that many)."""
        self._counts[index] += weight
        self._sum_ns += ns * weight
        self._extend(ns, ns)

    def _extend(self, low: int, high: int) -> None:
        if low < self._min_ns:
            self._min_ns = low
        if high > self._max_ns:
            self._max_ns = high

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for i, n in enumerate(other.counts):
            counts[i] += n
        self._sum_ns += other.sum_ns
        self._extend(other._min_ns, other._max_ns)

    def copy(self) -> Histogram:
        clone = Histogram()
        clone.merge(self)
        return clone

    def with_zeros(self, zeros: int) -> Histogram:
        """A copy with `zeros` more observations of 0."""
        clone = self.copy()
        if zeros > 0:
            clone._counts[0] += zeros
            clone._extend(0, 0)
        return clone

    def minus(self, earlier: Histogram) -> Histogram:
        """What was observed since `earlier` (a copy taken from this histogram).

        The window's own extremes are not known, only bounded by this histogram's: exact when
        the window set a new one (this max above earlier's), an upper (lower) bound otherwise.
        """
        diff = Histogram()
        diff._counts = [a - b for a, b in zip(self.counts, earlier.counts, strict=True)]
        diff._sum_ns = self.sum_ns - earlier.sum_ns
        if any(diff._counts):
            diff._extend(self._min_ns, self._max_ns)
        return diff

    def mean_s(self) -> float:
        return self.sum_ns / self.count / 1e9 if self.count else 0.0

    def quantile_s(self, q: float) -> float:
        """Estimated q-quantile in seconds: linear within the bucket, like PromQL's, then kept
        within the smallest and largest duration observed (the last bucket, open above,
        reaches up to the largest)."""
        if not self.count:
            return 0.0
        low = self.min_ns / 1e9
        high = self.max_ns / 1e9
        rank = q * self.count
        seen = 0
        estimate = BUCKET_BOUNDS_S[-1]
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                lower = BUCKET_BOUNDS_S[i - 1] if i else 0.0
                upper = BUCKET_BOUNDS_S[i] if i < len(BUCKET_BOUNDS_S) else max(high, lower)
                estimate = lower + (upper - lower) * (rank - seen) / n
                break
            seen += n
        return min(high, max(low, estimate))


class TrafficStats:
    """What clients of one pool with one application_name did.

    Most holds are one request (a transaction of one statement, autocommit): their hold time is
    their query time, so they are observed once, in `single`; holds of several requests go to
    `hold_multi` and their requests to `query_multi`. `hold`, `query` and the counts are merged
    from those when read.
    """

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "clients_without_xact",
        "connect_to_first_query",
        "errors",
        "hold_multi",
        "idle_nonzero",
        "login",
        "logins",
        "pinned",
        "pinned_total",
        "query_multi",
        "session_state",
        "single",
        "wait_nonzero",
    )

    # The histograms a window (see advisor.subtract) or a merge covers.
    HISTOGRAMS: Final = ("single", "hold_multi", "query_multi", "wait_nonzero", "idle_nonzero",
                         "login", "connect_to_first_query")  # fmt: skip

    def __init__(self) -> None:
        self.bytes_received = 0  # from clients
        self.bytes_sent = 0  # to clients
        self.single = Histogram()  # holds of one request: lend .. release = request .. ReadyForQuery
        self.hold_multi = Histogram()  # other holds: lend .. release
        self.query_multi = Histogram()  # their requests: client request .. ReadyForQuery
        # Checkout waits and idle-in-transaction times are mostly 0; only the others are
        # observed (at release, so they never outnumber holds) and the zeros are implied.
        self.wait_nonzero = Histogram()
        self.idle_nonzero = Histogram()
        self.logins = 0
        self.login = Histogram()  # TCP accept .. ReadyForQuery of the welcome
        self.connect_to_first_query = Histogram()
        self.clients_without_xact = 0  # connected and left without running anything
        self.errors: Counter[str] = Counter()  # errors sent to clients, by PoolerError.reason
        self.session_state: Counter[str] = Counter()  # session-state statements, by kind
        # Clients holding a server until they leave (session_state_policy pin): now, and ever.
        self.pinned = 0
        self.pinned_total = 0

    def settle(self) -> None:
        for name in self.HISTOGRAMS:
            getattr(self, name).settle()

    def merge(self, other: TrafficStats) -> None:
        self.bytes_received += other.bytes_received
        self.bytes_sent += other.bytes_sent
        self.logins += other.logins
        self.clients_without_xact += other.clients_without_xact
        self.pinned += other.pinned
        self.pinned_total += other.pinned_total
        for name in self.HISTOGRAMS:
            getattr(self, name).merge(getattr(other, name))
        self.errors.update(other.errors)
        self.session_state.update(other.session_state)

    @property
    def hold(self) -> Histogram:
        """Lend .. release of every completed hold."""
        hold = self.single.copy()
        hold.merge(self.hold_multi)
        return hold

    @property
    def query(self) -> Histogram:
        """Client request .. ReadyForQuery of every request answered."""
        query = self.single.copy()
        query.merge(self.query_multi)
        return query

    @property
    def xact_count(self) -> int:
        """Transactions: lend .. release."""
        return self.single.count + self.hold_multi.count

    @property
    def query_count(self) -> int:
        """Requests answered: client sends .. ReadyForQuery with nothing due."""
        return self.single.count + self.query_multi.count

    @property
    def wait(self) -> Histogram:
        """Checkout wait of every completed hold: from needing a server to getting one."""
        return self.wait_nonzero.with_zeros(self.xact_count - self.wait_nonzero.count)

    @property
    def idle_in_xact(self) -> Histogram:
        """Per completed hold, the time the server sat idle in a transaction waiting on the client."""
        return self.idle_nonzero.with_zeros(self.xact_count - self.idle_nonzero.count)


class StatementStats:
    """Transactions attributed to one statement fingerprint (see PoolStats.account_statement)."""

    __slots__ = ("count", "hold", "idle_ns", "sample")

    def __init__(self, sample: str) -> None:
        self.sample = sample  # one raw text (truncated) for people to recognise it
        self.count = 0
        self.hold = Histogram()
        self.idle_ns = 0  # idle-in-transaction time summed over those transactions


class PoolStats:
    """Everything counted for one pool."""

    def __init__(self, *, max_applications: int = 20, max_statements: int = 100) -> None:
        self.apps: dict[str, TrafficStats] = {}
        self.statements: dict[str, StatementStats] = {}
        self.max_applications = max_applications
        self.max_statements = max_statements
        self.server_connects = 0
        self.server_connect = Histogram()
        self.server_connect_failures = 0
        self.started_ns = time.monotonic_ns()
        # Transactions attributed exactly until the budget runs out (new_pass refills it once a
        # second); past it, one is sampled when the countdown reaches `sample_at`, weighted
        # by the transactions since the previous sample (see account_sample).
        self.statement_budget = STATEMENT_EXACT_PER_SECOND
        self.budget_refilled_ns = self.started_ns
        self.sampled_since = 0
        self.sample_at = -_sample_gap()

    def new_pass(self, now_ns: int) -> None:
        """A maintenance pass: histograms settled (see Histogram); once a second, the next
        STATEMENT_EXACT_PER_SECOND transactions attributed exactly again."""
        for stats in self.apps.values():
            stats.settle()
        if now_ns - self.budget_refilled_ns < NS_PER_S:
            return
        self.budget_refilled_ns = now_ns
        self.statement_budget = STATEMENT_EXACT_PER_SECOND
        self.sampled_since = 0
        self.sample_at = -_sample_gap()

    def for_application(self, name: str) -> TrafficStats:
        """The TrafficStats a client with this application_name updates (bounded cardinality)."""
        stats = self.apps.get(name)
        if stats is None:
            if len(self.apps) >= self.max_applications and name != OTHER:
                return self.for_application(OTHER)
            stats = self.apps[name] = TrafficStats()
        return stats

    def for_statement(self, fingerprint: str, sample: bytes) -> StatementStats:
        stats = self.statements.get(fingerprint)
        if stats is None:
            if len(self.statements) >= self.max_statements and fingerprint != OTHER:
                return self.for_statement(OTHER, b"(statements past stats_max_statements)")
            text = sample.decode("utf-8", "replace")
            stats = self.statements[fingerprint] = StatementStats(text)
        return stats

    def account_statement(self, statement: bytes, held: int, idle: int, weight: int) -> None:
        """Attribute one transaction's hold to its statement's fingerprint, counted `weight` times.

        Fingerprinting a text never seen before costs microseconds (regular expressions), and
        with inline literals (pgbench, hand-written SQL) nearly every text is new. So
        `account_transaction` counts exactly the first `statement_budget`
        transactions of each second and every hold of STATEMENT_ALWAYS_NS or more;
        past that it samples one in STATEMENT_SAMPLE_EVERY on average (account_sample), weighted
        by the transactions it stands for, which keeps counts and hold totals unbiased while
        bounding the cost under load.
        """
        found = _fingerprint_cache.get(statement)
        if found is None:
            found = fingerprint(statement)
        stats = self.for_statement(found, statement)
        stats.count += weight
        stats.idle_ns += idle * weight
        stats.hold.observe_weighted(bisect_left(BOUNDS_NS, held), held, weight)

    def account_transaction(self, statement: bytes, held: int, idle: int) -> None:
        """A completed transaction (a TCP client's, or a `POST /sql` request's), within the
        budget that bounds the cost of fingerprinting (see account_statement)."""
        budget = self.statement_budget = self.statement_budget - 1
        if budget >= 0:
            self.account_statement(statement, held, idle, 1)
        elif held >= STATEMENT_ALWAYS_NS:
            self.account_long(statement, held, idle)
        elif budget <= self.sample_at:
            self.account_sample(statement, held, idle)

    def account_long(self, statement: bytes, held: int, idle: int) -> None:
        """A hold of STATEMENT_ALWAYS_NS or more past the exact budget: attributed exactly, so
        the next sample does not stand for it."""
        self.sampled_since -= 1
        self.account_statement(statement, held, idle, 1)

    def account_sample(self, statement: bytes, held: int, idle: int) -> None:
        """The countdown reached `sample_at`: this transaction stands for every one since the
        previous sample. The gaps are random (mean STATEMENT_SAMPLE_EVERY), so a workload that
        cycles through a few statements cannot always put the same one on the sample."""
        budget = self.statement_budget
        self.account_statement(statement, held, idle, self.sampled_since - budget)
        self.sampled_since = budget
        self.sample_at = budget - _sample_gap()

    def totals(self) -> TrafficStats:
        total = TrafficStats()
        for stats in self.apps.values():
            total.merge(stats)
        return total

    # Shorthands used by the console, logs and tests.
    @property
    def xact_count(self) -> int:
        return sum(s.xact_count for s in self.apps.values())

    @property
    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for stats in self.apps.values():
            total.update(stats.errors)
        return total


class Snapshot:
    """Pool totals (and per application) at one moment, for rates and windowed percentiles."""

    __slots__ = ("apps", "at_ns", "totals")

    def __init__(self, stats: PoolStats) -> None:
        self.at_ns = time.monotonic_ns()
        self.totals = stats.totals()
        self.apps: dict[str, TrafficStats] = {}
        for name, app in stats.apps.items():
            copy = self.apps[name] = TrafficStats()
            copy.merge(app)


# --------------------------------------------------------------------------- fingerprints

_COMMENT = re.compile(rb"--[^\n]*|/\*.*?\*/", re.S)
_STRING = re.compile(rb"'(?:[^']|'')*'|\$(\w*)\$.*?\$\1\$", re.S)
_PARAM = re.compile(rb"\$\d+")
_NUMBER = re.compile(rb"(?<![\w$.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LIST = re.compile(rb"\(\s*\?(?:\s*,\s*\?)+\s*\)")
_FINGERPRINT_CACHE_MAX: Final = 4096
STATEMENT_ALWAYS_NS: Final = 10_000_000  # holds this long are always attributed (10 ms)
# Fingerprinting a new text costs 4-12 µs, about half a transaction's whole proxy cost: past
# the exact budget, one transaction in this many (on average) is attributed.
STATEMENT_SAMPLE_EVERY: Final = 64
STATEMENT_EXACT_PER_SECOND: Final = 100
NS_PER_S: Final = 1_000_000_000
_fingerprint_cache: dict[bytes, str] = {}
FINGERPRINT_MAX_CHARS: Final = 200


# Its own generator: the global one's state belongs to the application (and to tests that
# seed it or check that nothing else draws from it).
_sampling = random.Random()


def _sample_gap() -> int:
    """Transactions until the next sample: uniform in 1 .. 2 x STATEMENT_SAMPLE_EVERY - 1."""
    return 1 + int(_sampling.random() * (2 * STATEMENT_SAMPLE_EVERY - 1))  # randint costs 5x this


def fingerprint(statement: bytes) -> str:
    """The statement with literals and parameters replaced by '?', whitespace folded.

    Called once per transaction, so it must be cheap even when every statement is new (inline
    literals, as pgbench sends them): the passes for comments, quoted strings and $n run only
    when their first character occurs at all, and repeated texts come from a cache.
    """
    found = _fingerprint_cache.get(statement)
    if found is not None:
        return found
    text = statement
    nul = text.find(b"\0")
    if nul >= 0:  # a Parse's text as the rewriting tracker notes it: its terminator and more follow
        text = text[:nul]
    if b"'" in text or b"--" in text or b"/*" in text or b"$" in text:
        text = _COMMENT.sub(b" ", text)
        text = _STRING.sub(b"?", text)
        text = _PARAM.sub(b"?", text)
    text = _NUMBER.sub(b"?", text)
    if b"," in text:
        text = _LIST.sub(b"(...)", text)
    result = b" ".join(text.split()).decode("utf-8", "replace")[:FINGERPRINT_MAX_CHARS]
    if len(_fingerprint_cache) >= _FINGERPRINT_CACHE_MAX:
        _fingerprint_cache.clear()
    _fingerprint_cache[statement] = result
    return result
