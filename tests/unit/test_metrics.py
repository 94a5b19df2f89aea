"""What /metrics exposes, read from the collector itself (no sockets): build and process
metrics, Prometheus naming conventions over every family, the series each pool costs with and
without the application_name split, and the HTTP answers a HEAD shares with a GET."""

from __future__ import annotations

import importlib.metadata
import platform
import re
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from pypooler import __version__
from pypooler.metrics import MetricsServer, Reply
from pypooler.protocol import codec
from pypooler.revision import GIT_REVISION
from pypooler.stats import BUCKET_BOUNDS_S
from tests.support.prometheus import APPLICATIONS, metrics_with_traffic

README = Path(__file__).resolve().parents[2] / "README.md"

# Series one pool costs (README, "Series per pool"): 6 histograms of len(BUCKET_BOUNDS_S) + 1
# buckets, _sum and _count; 7 counters and 1 gauge per application_name; 35 of the pool's own.
HISTOGRAM_SERIES = 6 * (len(BUCKET_BOUNDS_S) + 3)
PER_APPLICATION = HISTOGRAM_SERIES + 8
PER_POOL = 35
HOLDER_SERIES = 5  # pypooler_holders{state} (4 states) and pypooler_holders_blocked


def families(server: MetricsServer) -> dict[str, Any]:
    text = generate_latest(server.prometheus).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def pool_series(server: MetricsServer) -> int:
    text = generate_latest(server.prometheus).decode()
    return sum(
        1
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("database") == "app" and sample.labels.get("user") == "alice"
    )


# -- what runs ---------------------------------------------------------------------------------


def test_build_info_names_what_runs() -> None:
    (build,) = families(metrics_with_traffic())["pypooler_build_info"].samples
    assert build.name == "pypooler_build_info" and build.value == 1
    assert build.labels == {
        "version": __version__,
        "revision": GIT_REVISION,
        "python_version": platform.python_version(),
        "compiled": "true" if codec.NATIVE else "false",
        "uvloop_version": importlib.metadata.version("uvloop"),
    }


def test_process_metrics_memory_cpu_and_descriptors_against_the_limit() -> None:
    found = families(metrics_with_traffic())

    def value(name: str) -> float:
        (sample,) = found[name].samples
        return float(sample.value)

    assert value("process_resident_memory_bytes") > 1 << 20
    assert value("process_cpu_seconds") > 0  # the counter's family, its sample is _total
    assert 3 <= value("process_open_fds") <= value("process_max_fds")
    assert value("process_start_time_seconds") > 1.7e9
    assert found["python_info"].samples[0].labels["version"] == platform.python_version()


# -- naming conventions ------------------------------------------------------------------------

# Every label a pypooler_* family may carry, each with one meaning (a second name for the same
# thing, `db` or `application`, fails the test).
LABELS = {
    "database": "the database name clients ask for (the [databases] entry)",
    "user": "the user servers log in as (the pool's)",
    "application_name": "the client's application_name (bounded by stats_max_applications)",
    "state": "the state of the clients or servers counted",
    "reason": "why pypooler sent a client an error",
    "kind": "the kind of session state a statement left",
    "fingerprint": "a statement with its literals stripped (bounded by stats_max_statements)",
    "transport": "how clients reached pypooler: tcp, unix, websocket, http (four values)",
}
BUILD_LABELS = {"version", "revision", "python_version", "compiled", "uvloop_version"}
# Units Prometheus wants as base units (seconds, bytes) or as ratios.
NOT_BASE_UNITS = {
    "ms", "us", "ns", "msec", "millis", "milliseconds", "microseconds", "nanoseconds",
    "minutes", "hours", "days", "kb", "mb", "gb", "kib", "mib", "kilobytes", "megabytes",
    "percent", "pct",
}  # fmt: skip
# A name about time must say its unit.
TIME_WORDS = {"time", "duration", "latency", "age", "wait", "delay", "timeout"}
SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created", "_info")


def convention_problems(family: Any) -> list[str]:
    name, kind = family.name, family.type
    words = name.split("_")
    problems = []
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or "__" in name:
        problems.append("not snake_case")
    if not family.documentation.strip():
        problems.append("no help text")
    if set(words) & NOT_BASE_UNITS:
        problems.append(f"non-base unit {sorted(set(words) & NOT_BASE_UNITS)}")
    if set(words) & TIME_WORDS and "seconds" not in words:
        problems.append("a time without _seconds")
    for unit in ("seconds", "bytes"):  # the unit is the last word, before _total for a counter
        if unit in words and words[-1] != unit:
            problems.append(f"{unit} is not the suffix")
    sample_names = {sample.name for sample in family.samples}
    if kind == "counter" and sample_names - {name + "_total"}:
        problems.append(f"counter samples {sorted(sample_names)} not all {name}_total")
    if kind == "gauge" and name.endswith(SUFFIXES[:-1]):
        problems.append("a gauge named like a counter or histogram part")
    if kind == "histogram":
        if words[-1] not in ("seconds", "bytes"):
            problems.append("a histogram without a base unit suffix")
        if sample_names - {name + "_bucket", name + "_sum", name + "_count"}:
            problems.append(f"histogram samples {sorted(sample_names)}")
    for sample in family.samples:
        labels = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
        if name == "pypooler_build_info" or not name.startswith("pypooler_"):
            continue  # build_info's own labels, checked below; prometheus-client's
        if labels - set(LABELS):
            problems.append(f"labels outside the vocabulary: {sorted(labels - set(LABELS))}")
    return problems


def test_every_family_follows_the_prometheus_conventions() -> None:
    found = families(metrics_with_traffic())
    # Every pypooler_* family has samples here, so labels are checked on each one.
    assert all(family.samples for name, family in found.items() if name.startswith("pypooler_"))
    problems = {name: convention_problems(family) for name, family in found.items()}
    assert {name: found for name, found in problems.items() if found} == {}
    assert {name.split("_")[0] for name in found} == {"pypooler", "process", "python"}
    assert set(found["pypooler_build_info"].samples[0].labels) == BUILD_LABELS
    assert found["pypooler_build_info"].type == "gauge"
    readme = README.read_text()
    exposed = {name + "_total" if family.type == "counter" else name for name, family in found.items()}
    assert {name for name in exposed if f"`{name}" not in readme} == set()  # each one documented
    # No family's name is another's plus a reserved suffix: OpenMetrics would see one family.
    names = set(found)
    assert {name for name in names for suffix in SUFFIXES if name + suffix in names} == set()


def test_openmetrics_output_parses_with_the_same_families() -> None:
    server = metrics_with_traffic()
    # prometheus-client's OpenMetrics functions have no annotations.
    text = generate_openmetrics(server.prometheus).decode()  # type: ignore[no-untyped-call]
    parsed = parse_openmetrics(text)  # type: ignore[no-untyped-call]  # the strict parser
    openmetrics = {family.name: family.type for family in parsed}
    assert openmetrics.pop("pypooler_build") == "info"  # the text format's pypooler_build_info gauge
    assert set(openmetrics) == set(families(server)) - {"pypooler_build_info"}


# -- series per pool ---------------------------------------------------------------------------


def test_series_per_pool_with_and_without_the_application_split() -> None:
    # Beyond the per-application series: 1 error reason and 1 session-state kind seen (web),
    # 2 statement fingerprints of 2 series each.
    extra = 1 + 1 + 2 * 2
    split = metrics_with_traffic()
    assert pool_series(split) == PER_POOL + len(APPLICATIONS) * PER_APPLICATION + extra
    merged = metrics_with_traffic(metrics_per_application=False)
    assert pool_series(merged) == PER_POOL + HISTOGRAM_SERIES + len(APPLICATIONS) * 8 + extra
    # The merged histograms hold every application's observations.
    holds = families(merged)["pypooler_hold_seconds"].samples
    (count,) = [s for s in holds if s.name == "pypooler_hold_seconds_count"]
    assert count.value == 2 * len(APPLICATIONS) and "application_name" not in count.labels
    # The README's arithmetic is this one.
    readme = README.read_text()
    # The README counts the holder series too (pypooler_holders by state, _blocked: app.py's
    # HolderCollector, not this collector).
    for number in (HISTOGRAM_SERIES, PER_APPLICATION, PER_POOL + HOLDER_SERIES):
        assert f"{number} series" in readme, number


def test_counters_keep_the_application_split_either_way() -> None:
    merged = families(metrics_with_traffic(metrics_per_application=False))
    apps = {s.labels["application_name"] for s in merged["pypooler_transactions"].samples}
    assert apps == set(APPLICATIONS)


# -- the HTTP answers --------------------------------------------------------------------------


def test_a_head_gets_the_headers_a_get_gets_without_the_body() -> None:
    reply = Reply("200 OK", b"twelve bytes", headers=(("Content-Encoding", "gzip"),))
    get, head = reply.encode(with_body=True), reply.encode(with_body=False)
    assert get == head + b"twelve bytes"
    assert b"\r\nContent-Length: 12\r\n" in head and head.endswith(b"\r\n\r\n")
