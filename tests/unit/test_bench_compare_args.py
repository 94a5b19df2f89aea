"""bench/compare's command line: the baseline flags and how the baseline is named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.compare import RunResult, baseline_name, parse_args, parse_points, ratio_runs


def test_baseline_flags_need_a_baseline() -> None:
    for flag in (["--baseline-compiled"], ["--baseline-patch", "x.patch"]):
        with pytest.raises(SystemExit):
            parse_args(flag)


def test_compiled_baseline_is_named_after_its_build() -> None:
    args = parse_args(["--baseline", "653abe3", "--baseline-compiled"])
    assert args.baseline_compiled
    assert baseline_name(args.baseline, None, args.baseline_compiled) == "pypooler@653abe3+mypyc"
    patched = baseline_name("HEAD", Path("bench/baselines/no-stats.patch"))
    assert patched == "pypooler@HEAD+no-stats"


def test_prepared_points_bring_their_simple_counterpart_for_the_ratio() -> None:
    points = parse_points("10,100P,20C")
    assert [point.label for point in points] == ["-S c=10", "-S -M prepared c=100", "-S -C c=20", "-S c=100"]
    prepared = points[1]
    runs = [
        RunResult(1, prepared, "pypooler", tps=1100.0),
        RunResult(1, prepared.simple, "pypooler", tps=1000.0),
        RunResult(1, prepared.simple, "PgBouncer", tps=1200.0),
    ]
    assert [run.tps for run in ratio_runs(runs, prepared)] == [1100.0, 1200.0]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_points("100X")
