"""Per-pool counters fed by connection events.

Hot-path rule: updating a counter is a plain attribute increment on a `__slots__` object; nothing
here formats text, allocates labels or takes a lock. Readers (logs, admin console, metrics) compute
averages and rates from these totals when asked.
"""

from __future__ import annotations

from collections import Counter


class PoolStats:
    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "errors",
        "pinned",
        "pinned_total",
        "server_connect_failures",
        "server_connect_ns",
        "server_connects",
        "session_state",
        "total_hold_ns",
        "total_wait_ns",
        "wait_count",
        "xact_count",
    )

    def __init__(self) -> None:
        self.xact_count = 0  # transactions (lend..release) completed
        self.total_hold_ns = 0  # sum of lend..release durations
        self.wait_count = 0  # checkouts that had to queue
        self.total_wait_ns = 0  # sum of queue durations
        self.server_connects = 0
        self.server_connect_ns = 0
        self.server_connect_failures = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.errors: Counter[str] = Counter()  # errors sent to clients, by PoolerError.reason
        # Statements that leave session state in transaction mode, by (kind, application_name).
        self.session_state: Counter[tuple[str, str]] = Counter()
        self.pinned = 0  # clients holding a server until they leave (session_state_policy pin)
        self.pinned_total = 0

    def average_hold_ms(self) -> float:
        return self.total_hold_ns / self.xact_count / 1e6 if self.xact_count else 0.0

    def average_wait_ms(self) -> float:
        return self.total_wait_ns / self.wait_count / 1e6 if self.wait_count else 0.0
