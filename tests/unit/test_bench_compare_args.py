"""bench/compare's command line: the baseline flags and how the baseline is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.compare import baseline_name, parse_args


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
