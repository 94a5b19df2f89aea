"""LogLimiter: a bounded number of lines per key and interval, then one summary."""

from __future__ import annotations

import logging

import pytest

from pypooler.log_limits import LogLimiter
from tests.support.clock import FakeClock

S = 1_000_000_000


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.INFO, logger="test.limits")
    return logging.getLogger("test.limits")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_lines_beyond_the_limit_are_counted_then_summarised_at_the_next_interval(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    limiter = LogLimiter(3, 60, clock=clock)

    written = [limiter.log(logger, logging.WARNING, "refused", "refused %s", n) for n in range(1000)]

    assert written == [True] * 3 + [False] * 997
    assert lines(caplog) == ["refused 0", "refused 1", "refused 2"]
    clock.now = 59 * S
    assert not limiter.log(logger, logging.WARNING, "refused", "refused %s", "late")
    clock.now = 60 * S
    assert limiter.log(logger, logging.WARNING, "refused", "refused %s", "again")
    assert lines(caplog)[3:] == [
        "998 similar lines suppressed in 60 s; the last: refused late",
        "refused again",
    ]
    assert caplog.records[3].levelno == logging.WARNING


def test_flush_summarises_a_key_that_went_quiet_once_its_interval_is_over(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    limiter = LogLimiter(1, 10, clock=clock)
    for _ in range(5):
        limiter.log(logger, logging.INFO, "k", "same line")

    limiter.flush()  # not over yet: nothing
    assert lines(caplog) == ["same line"]
    clock.now = 10 * S
    limiter.flush()
    limiter.flush()  # once only
    assert lines(caplog) == ["same line", "4 similar lines suppressed in 10 s; the last: same line"]


def test_keys_are_limited_separately(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    limiter = LogLimiter(1, 60, clock=FakeClock())
    for key in ("a", "b", "a", "b"):
        limiter.log(logger, logging.INFO, key, "line %s", key)
    assert lines(caplog) == ["line a", "line b"]


def test_past_max_keys_new_keys_share_one_limit(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = LogLimiter(2, 60, max_keys=3, clock=FakeClock())
    for user in range(100):
        limiter.log(logger, logging.INFO, ("auth_failed", f"user{user}"), "refused user%d", user)
    # three keys of their own, then every other one in the overflow key's two lines
    assert lines(caplog) == [
        "refused user0",
        "refused user1",
        "refused user2",
        "refused user3",
        "refused user4",
    ]


def test_a_disabled_level_costs_nothing_and_counts_nothing(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    limiter = LogLimiter(1, 60, clock=clock)
    for _ in range(5):
        assert not limiter.log(logger, logging.DEBUG, "k", "quiet")
    clock.now = 60 * S
    limiter.flush()
    assert lines(caplog) == []
