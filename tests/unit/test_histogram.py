"""Histogram quantiles are estimates, but never outside what was observed (issue 17: one 30 s
statement showed p50 45 s and p99 59.7 s)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pypooler.stats import Histogram

NS = 1_000_000_000
# Durations from 0 to 100 s: every bucket, the one above the last bound (60 s) included.
durations = st.lists(st.integers(min_value=0, max_value=100 * NS), min_size=1, max_size=200)
quantiles = st.floats(min_value=0.0, max_value=1.0)
# A quantile is computed in float seconds: allow for the rounding of ns / 1e9.
SLACK_S = 1e-9


def filled(values: list[int], *, pending: bool) -> Histogram:
    """The hot path's way (pending, settled when read) or the rare paths' (observe)."""
    histogram = Histogram()
    for ns in values:
        if pending:
            histogram.pending.append(ns)
        else:
            histogram.observe(ns)
    return histogram


def within(value: float, low_ns: int, high_ns: int) -> bool:
    return low_ns / NS - SLACK_S <= value <= high_ns / NS + SLACK_S


@given(durations, quantiles, st.booleans())
def test_a_quantile_is_never_below_the_minimum_or_above_the_maximum(
    values: list[int], q: float, pending: bool
) -> None:
    histogram = filled(values, pending=pending)
    assert (histogram.min_ns, histogram.max_ns) == (min(values), max(values))
    assert within(histogram.quantile_s(q), min(values), max(values))


@given(durations, durations, quantiles)
def test_a_window_stays_within_the_extremes_and_is_exact_at_a_new_maximum(
    before: list[int], during: list[int], q: float
) -> None:
    histogram = filled(before, pending=True)
    earlier = histogram.copy()
    histogram.pending.extend(during)
    window = histogram.minus(earlier)
    everything = before + during
    assert within(window.quantile_s(q), min(everything), max(everything))
    if max(during) > max(before):  # the window holds the largest: its own bound is exact
        assert within(window.quantile_s(q), 0, max(during))


@given(durations, durations, quantiles, st.integers(min_value=0, max_value=50))
def test_merges_and_implied_zeros_keep_the_bounds(
    first: list[int], second: list[int], q: float, zeros: int
) -> None:
    merged = filled(first, pending=True)
    merged.merge(filled(second, pending=False))
    with_zeros = merged.with_zeros(zeros)
    low = 0 if zeros else min(first + second)
    assert within(with_zeros.quantile_s(q), low, max(first + second))


def test_one_long_statement_is_its_own_p50_and_p99() -> None:
    histogram = filled([30_030_000_000], pending=True)
    assert histogram.quantile_s(0.5) == pytest.approx(30.03)
    assert histogram.quantile_s(0.99) == pytest.approx(30.03)


def test_above_the_last_bound_the_estimate_reaches_the_maximum() -> None:
    histogram = filled([70 * NS, 90 * NS], pending=False)
    assert 60 < histogram.quantile_s(0.5) < 90
    assert histogram.quantile_s(1.0) == pytest.approx(90)


def test_an_empty_histogram_reports_zero() -> None:
    empty = Histogram()
    assert (empty.quantile_s(0.99), empty.min_ns, empty.max_ns) == (0.0, 0, 0)
