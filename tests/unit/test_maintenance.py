"""Tests for pypooler.maintenance: the interval rule, and the pass driven by a fake clock over
fake registries (the pool-level checks run on real pools in test_pool.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import pytest

from pypooler import maintenance
from pypooler import pool as pool_module
from pypooler.config import Settings, load_settings
from pypooler.log_limits import LogLimiter
from pypooler.maintenance import (
    CANCEL_TIMEOUT_S,
    MAX_INTERVAL_S,
    MIN_INTERVAL_S,
    Maintenance,
    maintenance_interval,
    watch_holders,
)
from pypooler.protocol.errors import IdleTransactionTimeout, PoolerError
from pypooler.protocol.transaction import FrontendStream
from tests.support.clock import FakeClock

if TYPE_CHECKING:
    from pypooler.pool import Pool, PoolManager
    from pypooler.registry import ClientRegistry
    from pypooler.server import ServerConnection

NS = 1_000_000_000

EVERY_PERIOD_OFF: dict[str, Any] = {
    "query_wait_timeout": 0,
    "client_login_timeout": 0,
    "idle_transaction_timeout": 0,
    "hold_warn_ms": 0,
    "holder_diagnosis_ms": 0,
    "server_idle_timeout": 0,
    "server_lifetime": 0,
    "server_login_retry": 0,
    "autodb_idle_timeout": 0,
    "query_timeout": 0,
    "client_idle_timeout": 0,
    "stats_period": 3600,
}


def settings(**overrides: Any) -> Settings:
    return load_settings(None, env={}, **overrides)


# --------------------------------------------------------------------------- the interval rule


def test_defaults_pass_ten_times_per_hold_warn_ms() -> None:
    # hold_warn_ms (1 s) is the shortest default period: hog warnings come at most 0.1 s late.
    assert maintenance_interval(settings()) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("idle_transaction_timeout", 2.0, 0.2),  # ignored by the interval before issue 15
        ("server_lifetime", 3.0, 0.3),  # likewise
        ("hold_warn_ms", 4000.0, 0.4),  # likewise, and in milliseconds
        ("holder_diagnosis_ms", 4500.0, 0.45),
        ("query_wait_timeout", 5.0, 0.5),
        ("client_login_timeout", 6.0, 0.6),
        ("server_idle_timeout", 7.0, 0.7),
        ("server_login_retry", 8.0, 0.8),
        ("stats_period", 9.0, 0.9),
        ("autodb_idle_timeout", 2.5, 0.25),
        ("query_timeout", 1.5, 0.15),
        ("client_idle_timeout", 3.5, 0.35),
    ],
)
def test_every_enabled_period_counts(name: str, value: float, expected: float) -> None:
    assert maintenance_interval(settings(**{**EVERY_PERIOD_OFF, name: value})) == pytest.approx(expected)


def test_the_interval_is_clamped() -> None:
    assert maintenance_interval(settings(idle_transaction_timeout=0.1)) == MIN_INTERVAL_S
    # Only long periods: still a pass a second.
    assert maintenance_interval(settings(**EVERY_PERIOD_OFF)) == MAX_INTERVAL_S


def test_a_disabled_timeout_does_not_count() -> None:
    base = {**EVERY_PERIOD_OFF, "query_wait_timeout": 5.0}
    assert maintenance_interval(settings(**{**base, "idle_transaction_timeout": 0})) == pytest.approx(0.5)


# --------------------------------------------------------------------------- the pass


class FakeManager:
    def __init__(self) -> None:
        self.pools: dict[tuple[str, str], Any] = {}
        self.auto_pools = 0
        self.snapshots = 0
        self.log_limiter = LogLimiter()

    def take_snapshots(self) -> None:
        self.snapshots += 1


class FakeLogin:
    def __init__(self, connected_ns: int) -> None:
        self.connected_ns = connected_ns
        self.timed_out: list[float] = []

    def login_timed_out(self, timeout: float) -> None:
        self.timed_out.append(timeout)


class FakeTask:
    def __init__(self) -> None:
        self.cancelled = False

    def done(self) -> bool:
        return self.cancelled


class FakeRegistry:
    def __init__(self) -> None:
        self.logging_in: dict[FakeLogin, None] = {}
        self.cancels: dict[FakeTask, int] = {}
        self.abandoned: list[FakeTask] = []

    def cancel_timed_out(self, task: FakeTask, timeout: float) -> None:
        task.cancelled = True
        self.abandoned.append(task)


# The pass is typed for the real manager and registry, classes a fake cannot be (mypyc compiles
# them); run from the sources it takes anything with what it reads, as these fakes have.


def maintenance_over(
    manager: FakeManager,
    registry: FakeRegistry,
    settings: Settings,
    clock: FakeClock,
    resume_accepting: Callable[[], None] | None = None,
) -> Maintenance:
    return Maintenance(
        cast("PoolManager", manager),
        cast("ClientRegistry", registry),
        settings,
        clock=clock,
        resume_accepting=resume_accepting,
    )


def make(**overrides: Any) -> tuple[Maintenance, FakeManager, FakeRegistry, FakeClock]:
    manager, registry, clock = FakeManager(), FakeRegistry(), FakeClock(1_000 * NS)
    pass_ = maintenance_over(manager, registry, settings(**overrides), clock)
    return pass_, manager, registry, clock


def test_snapshots_every_stats_period() -> None:
    pass_, manager, _, clock = make(stats_period=10)
    for _ in range(9):
        clock.now += NS
        pass_.run(clock.now)
    assert manager.snapshots == 0
    clock.now += NS
    pass_.run(clock.now)
    assert manager.snapshots == 1
    clock.now += 5 * NS
    pass_.run(clock.now)
    assert manager.snapshots == 1
    clock.now += 5 * NS
    pass_.run(clock.now)
    assert manager.snapshots == 2
    clock.now += 100 * NS  # the loop stalled: one snapshot, then a period from now
    pass_.run(clock.now)
    clock.now += NS
    pass_.run(clock.now)
    assert manager.snapshots == 3


def test_client_login_timeout_ends_only_late_logins() -> None:
    pass_, _, registry, clock = make(client_login_timeout=2)
    start = clock.now
    old, young = FakeLogin(start), FakeLogin(start + NS)
    registry.logging_in = {old: None, young: None}
    pass_.run(start + 2 * NS - 1)
    assert (old.timed_out, young.timed_out) == ([], [])
    pass_.run(start + 2 * NS)
    assert (old.timed_out, young.timed_out) == ([2.0], [])
    assert list(registry.logging_in) == [young]
    pass_.run(start + 3 * NS)
    assert young.timed_out == [2.0] and not registry.logging_in


def test_client_login_timeout_zero_waits_forever() -> None:
    pass_, _, registry, clock = make(client_login_timeout=0)
    login = FakeLogin(clock.now)
    registry.logging_in = {login: None}
    pass_.run(clock.now + 10**6 * NS)
    assert login.timed_out == []


def test_cancels_in_flight_are_abandoned_after_the_cancel_timeout() -> None:
    pass_, _, registry, clock = make()
    old, young = FakeTask(), FakeTask()
    registry.cancels = {old: clock.now, young: clock.now + NS}
    pass_.run(clock.now + int(CANCEL_TIMEOUT_S * NS))
    assert registry.abandoned == [old]
    assert list(registry.cancels) == [young]


def test_reload_recomputes_the_interval_and_the_snapshot_time() -> None:
    pass_, manager, _, clock = make(**EVERY_PERIOD_OFF)
    assert pass_.interval == MAX_INTERVAL_S
    pass_.reload(settings(**{**EVERY_PERIOD_OFF, "idle_transaction_timeout": 1.0, "stats_period": 5}))
    assert pass_.interval == pytest.approx(0.1)
    clock.now += 5 * NS
    pass_.run(clock.now)
    assert manager.snapshots == 1


def test_accepting_is_resumed_by_the_pass() -> None:
    manager, registry, clock = FakeManager(), FakeRegistry(), FakeClock(1_000 * NS)
    resumed: list[int] = []
    pass_ = maintenance_over(manager, registry, settings(), clock, lambda: resumed.append(1))
    pass_.run(clock.now)
    assert resumed == [1]


# --------------------------------------------------------------------------- hog detection


class FakeHolder:
    """A pool.Holder lent at `idle_since_ns` and idle since (in a transaction unless told otherwise)."""

    def __init__(self, name: str, idle_since_ns: int, *, in_xact: bool = True) -> None:
        self.server: ServerConnection | None = None
        self.peer = f"127.0.0.1:{name}"
        self.application_name = name
        self.lent_ns = self.query_start_ns = idle_since_ns
        self.idle_since_ns = idle_since_ns
        self.idle_ns = 0
        self.idle_in_xact = in_xact
        self.hog_warned = False
        self.frontend = FrontendStream()
        self.failures: list[PoolerError] = []

    def fail(self, exc: PoolerError) -> None:
        self.failures.append(exc)


class FakeHolderPool:
    database = "app"
    user = "alice"

    def __init__(self, holders: list[FakeHolder]) -> None:
        self._holders = holders

    def holders(self, now_ns: int) -> list[FakeHolder]:
        return self._holders


def as_pool(fake: FakeHolderPool) -> Pool:
    """watch_holders reads only what FakeHolderPool has (see the casts above)."""
    return cast("Pool", fake)


@pytest.mark.skipif(
    not pool_module.__file__ or not pool_module.__file__.endswith(".py"),
    reason="the log line's describe_holder (pool.py) needs a real client when compiled",
)
def test_idle_transaction_timeout_ends_and_hold_warn_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    now = 1_000 * NS
    long_idle = FakeHolder("long", now - 3 * NS)
    warned = FakeHolder("warned", now - int(1.5 * NS))
    fresh = FakeHolder("fresh", now - NS // 2)
    outside = FakeHolder("outside", now - 10 * NS, in_xact=False)  # idle, but between statements
    pool = FakeHolderPool([long_idle, warned, fresh, outside])
    with caplog.at_level("WARNING", logger="pypooler.maintenance"):
        watch_holders(as_pool(pool), now, 2.0, 1000.0)
        watch_holders(as_pool(pool), now, 2.0, 1000.0)
    assert len(long_idle.failures) == 2  # the client ends itself at the first; a fake does not
    assert isinstance(long_idle.failures[0], IdleTransactionTimeout)
    assert (warned.failures, fresh.failures, outside.failures) == ([], [], [])
    assert warned.hog_warned and not fresh.hog_warned
    lines = [r.getMessage() for r in caplog.records if "idle in transaction" in r.getMessage()]
    assert len(lines) == 1 and "app=warned" in lines[0]


def test_module_docstring_states_the_interval_rule() -> None:
    doc = maintenance.__doc__ or ""
    assert "a tenth of the shortest enabled period" in doc


def test_holders_held_past_holder_diagnosis_ms_are_gathered_for_the_advisor() -> None:
    now = 1_000 * NS
    long, short = FakeHolder("long", now - 2 * NS), FakeHolder("short", now - NS // 2)
    pool = FakeHolderPool([long, short])
    assert watch_holders(as_pool(pool), now, 0.0, 0.0, diagnose_ms=1000.0) == [long]
    assert watch_holders(as_pool(pool), now, 0.0, 0.0) == []  # 0: never asked
