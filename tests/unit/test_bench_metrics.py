"""bench.run's reading of pypooler's /metrics: the hold table's numbers come from these."""

from __future__ import annotations

import math

import pytest

from bench.run import app_histogram, histogram_quantile

EXPOSITION = """\
# HELP pypooler_checkout_wait_seconds Time from a client needing a server to getting one.
# TYPE pypooler_checkout_wait_seconds histogram
pypooler_checkout_wait_seconds_bucket{application_name="a",database="d",le="0.0001",user="u"} 90.0
pypooler_checkout_wait_seconds_bucket{application_name="a",database="d",le="1.0",user="u"} 98.0
pypooler_checkout_wait_seconds_bucket{application_name="a",database="d",le="+Inf",user="u"} 100.0
pypooler_checkout_wait_seconds_sum{application_name="a",database="d",user="u"} 12.5
pypooler_checkout_wait_seconds_count{application_name="a",database="d",user="u"} 100.0
pypooler_checkout_wait_seconds_bucket{application_name="b",database="d",le="0.0001",user="u"} 1.0
pypooler_checkout_wait_seconds_bucket{application_name="b",database="d",le="1.0",user="u"} 1.0
pypooler_checkout_wait_seconds_bucket{application_name="b",database="d",le="+Inf",user="u"} 1.0
pypooler_checkout_wait_seconds_sum{application_name="b",database="d",user="u"} 0.0
pypooler_checkout_wait_seconds_count{application_name="b",database="d",user="u"} 1.0
"""


def test_app_histogram_reads_one_application_only() -> None:
    buckets, total, count = app_histogram(EXPOSITION, "pypooler_checkout_wait_seconds", "a")

    assert buckets == [(0.0001, 90.0), (1.0, 98.0), (math.inf, 100.0)]
    assert (total, count) == (12.5, 100.0)


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.45, 0.00005),  # inside the first bucket, linear from 0
        (0.94, 0.0001 + (1.0 - 0.0001) * 0.5),  # halfway through the second bucket
        (0.99, 1.0),  # in +Inf: the highest finite bound, as Prometheus does
    ],
)
def test_histogram_quantile_interpolates_like_prometheus(q: float, expected: float) -> None:
    buckets = [(0.0001, 90.0), (1.0, 98.0), (math.inf, 100.0)]

    assert histogram_quantile(buckets, q) == pytest.approx(expected)


def test_histogram_quantile_of_nothing_is_none() -> None:
    assert histogram_quantile([], 0.5) is None
    assert histogram_quantile([(1.0, 0.0), (math.inf, 0.0)], 0.5) is None
