"""The serverless story in numbers: `python -m bench.run [--quick] [--scenarios LIST]`.

One command starts a throwaway PostgreSQL (max_connections 100), PgBouncer and pypooler on
loopback, runs the scenarios below with progress on stderr, and writes
`bench/results/<date>_<time>/report.md` with PNG plots beside it:

- fanout: N concurrent serverless invocations (own asyncpg connection: connect, SELECT 1,
  close) arriving in bursts, direct vs PgBouncer vs pypooler.
- httpfanout: the same bursts from edge functions with the real `@neondatabase/serverless`
  driver (`bench/neon_fanout.mjs`): `neon()` over pypooler's `POST /sql`, and the driver's
  `Client` over a plain WebSocket-to-TCP relay (`bench.wsproxy`, no pooling: what its users
  run today) and over pypooler's own WebSocket endpoint.
- autoscale: the seed's outage: 12 application instances with a pool of 25 each against
  max_connections 100, direct vs through pypooler (pool_size 20).
- hold: the same arrival rate with a 5 ms and a 200 ms hold per transaction through pypooler;
  the wait histogram and Little's law from pypooler's own /metrics.
- pgbench: `pgbench -S` and TPC-B-like at several client counts, and `-S -C`, with the
  proxies' CPU per transaction (bench.compare's runner).
- idle: memory per idle client, 10,000 clients from several 127.0.0.x source addresses,
  pypooler's and PgBouncer's RSS.

Rules this module keeps (with bench.compare, whose helpers it uses):
- It measures and reports; it never asserts. Failures are results ("sorry, too many clients
  already" is the point of the direct rows).
- Every point runs at least twice (`--rounds`, minimum 2) and its targets run back to back
  within a round, so noise shows and ratios are taken within a round.
- Client load runs in separate processes (`bench.loadgen`), bounded in count and time; every
  process we start is stopped by its PID; only 127.0.0.0/8; listening ports below 32768.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import compare
from bench.compare import LOOPBACK, Point, Proxy, RunResult, progress
from pypooler.embedded import DEFAULT_DBNAME, SUPERUSER, EmbeddedPostgres, random_free_port

SCENARIOS = ("fanout", "httpfanout", "autoscale", "hold", "pgbench", "idle")
MIN_ROUNDS = 2
BENCH_MAX_CLIENT_CONN = 12_000  # above the 10,000 idle clients
LISTEN_BACKLOG = 4096  # pypooler's own backlog; PgBouncer gets the same (its default is 128)
STATS_MAX_APPLICATIONS = 200  # each hold run has its own application_name
FANOUT_TIMEOUT_S = 30.0  # an invocation's whole budget, as a function timeout would be
FANOUT_START_DELAY_S = 2.0  # client processes import and then start on one wall-clock instant
# The driver as tests/integration/test_neon_driver.py installs it (tests/node/package.json pins it).
NODE_DIR = Path(__file__).resolve().parent.parent / "tests" / "node"
NEON_DRIVER_DIR = NODE_DIR / "node_modules" / "@neondatabase" / "serverless"
NEON_FANOUT_SCRIPT = Path(__file__).resolve().parent / "neon_fanout.mjs"
NPM_TIMEOUT_S = 300
WSPROXY_START_TIMEOUT_S = 30.0
# The driver's connection string; the password is ignored (trust in PostgreSQL and pypooler).
NEON_PASSWORD = "x"
# HTTP fan-out targets: (name, driver mode, through the relay or pypooler's HTTP listener).
HTTP_DIRECT, HTTP_SQL, HTTP_WS = "direct WebSocket", "pypooler /sql", "pypooler WebSocket"
IDLE_SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 12))  # ten source addresses
IDLE_LOGIN_CONCURRENCY = 256
IDLE_TIMEOUT_S = 30.0
IDLE_SETTLE_S = 1.0
LOADGEN_GRACE_S = 60.0
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True, slots=True)
class Scale:
    """How big each scenario is; FULL is about 20 minutes on 2 cores, QUICK a few."""

    fanout_ns: tuple[int, ...]
    fanout_bursts: int
    http_fanout_ns: tuple[int, ...]
    fanout_client_procs: int
    autoscale_duration_s: float
    autoscale_rate: float
    hold_duration_s: float
    hold_rate: float
    pgbench_points: tuple[Point, ...]
    pgbench_duration_s: int
    idle_clients: int


def _points(select_only: Sequence[int], tpcb: Sequence[int], reconnect: Sequence[int]) -> tuple[Point, ...]:
    return (
        *(Point(n, reconnect=False) for n in select_only),
        *(Point(n, reconnect=False, tpcb=True) for n in tpcb),
        *(Point(n, reconnect=True) for n in reconnect),
    )


FULL = Scale(
    fanout_ns=(100, 1000, 5000), fanout_bursts=2, http_fanout_ns=(5000,), fanout_client_procs=2,
    autoscale_duration_s=15, autoscale_rate=600, hold_duration_s=12, hold_rate=120,
    pgbench_points=_points((10, 100, 500, 1000), (10, 100, 500, 1000), (20,)),
    pgbench_duration_s=6, idle_clients=10_000,
)  # fmt: skip
QUICK = Scale(
    fanout_ns=(100, 1000), fanout_bursts=1, http_fanout_ns=(1000,), fanout_client_procs=2,
    autoscale_duration_s=8, autoscale_rate=600, hold_duration_s=8, hold_rate=120,
    pgbench_points=_points((10, 100), (10,), (20,)),
    pgbench_duration_s=3, idle_clients=2000,
)  # fmt: skip

# The seed's outage: 12 instances x pool 25 = 300 against 100. Each request holds its pool
# connection across 400 ms of non-database work between two autocommit statements, so each
# instance's pool grows toward 25 while the server-side transactions stay short.
AUTOSCALE = {
    "instances": 12, "pool_max": 25, "queries": 2, "think_s": 0.4, "xact_hold_s": 0.0,
    "acquire_timeout_s": 5.0, "request_timeout_s": 10.0, "max_in_flight": 2000,
}  # fmt: skip
# One application with a client pool big enough never to be the bottleneck: pypooler's
# pool_size 20 is. 120/s x 5 ms needs 0.6 servers; 120/s x 200 ms needs 24 > 20.
HOLD = {
    "reset_on_release": False,  # one request = one transaction in pypooler's counts
    "instances": 1, "pool_max": 400, "queries": 1, "think_s": 0.0,
    "acquire_timeout_s": 30.0, "request_timeout_s": 30.0, "max_in_flight": 1000,
}  # fmt: skip
HOLD_TIMES_S = (0.005, 0.2)


# -- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class LoadResult:
    """One loadgen run (fanout bursts merged, or one pools run) against one target."""

    scenario: str
    round_no: int
    target: str
    point: str  # "N=1000", "12 x 25", "hold 200 ms"
    offered: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> float:
        return self.ok / self.offered if self.offered else 0.0

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = self.latencies  # loadgen sends them sorted
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(slots=True)
class IdleResult:
    round_no: int
    target: str
    clients: int
    ok: int
    rss_before_kib: int
    rss_after_kib: int
    login_s: float
    errors: dict[str, int]

    @property
    def kib_per_client(self) -> float | None:
        return (self.rss_after_kib - self.rss_before_kib) / self.ok if self.ok else None


@dataclass(slots=True)
class Run:
    """Everything one invocation of the harness measured."""

    scale: Scale
    rounds: int
    fanout: list[LoadResult] = field(default_factory=list)
    http_fanout: list[LoadResult] = field(default_factory=list)
    autoscale: list[LoadResult] = field(default_factory=list)
    hold: list[LoadResult] = field(default_factory=list)
    pgbench: list[RunResult] = field(default_factory=list)
    idle: list[IdleResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Steps:
    """Progress: "[7/52 3m12s]" before each line, so a user sees how far along the run is."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def report(self, message: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        progress(f"[{self.done}/{self.total} {elapsed // 60:.0f}m{elapsed % 60:02.0f}s] {message}")


# -- processes -------------------------------------------------------------------------------


def loadgen_env() -> dict[str, str]:
    env = compare.clean_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def run_loadgen(kind: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One loadgen process; its JSON answer, or {"failed": reason}."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", kind, json.dumps(params)],
            capture_output=True, text=True, env=loadgen_env(), timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"failed": f"loadgen {kind} gave no answer within {timeout_s:.0f} s (killed)"}
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        return {"failed": f"loadgen {kind} exit {result.returncode}: {tail}"}
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


def run_loadgens(kind: str, params_list: Sequence[dict[str, Any]], timeout_s: float) -> list[dict[str, Any]]:
    """Several loadgen processes at once (they align on params["start_at"])."""
    commands = [[sys.executable, "-m", "bench.loadgen", kind, json.dumps(params)] for params in params_list]
    return run_clients(f"loadgen {kind}", commands, timeout_s)


def run_clients(label: str, commands: Sequence[Sequence[str]], timeout_s: float) -> list[dict[str, Any]]:
    """Client processes at once, each answering one JSON line on stdout (the last), or
    {"failed": reason}; killed (by PID) if they have not answered within `timeout_s`."""
    procs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=loadgen_env()
        )
        for command in commands
    ]
    deadline = time.monotonic() + timeout_s
    answers: list[dict[str, Any]] = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            answers.append({"failed": f"{label} gave no answer within {timeout_s:.0f} s (killed)"})
            continue
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = " | ".join(err.strip().splitlines()[-3:])
            answers.append({"failed": f"{label} exit {proc.returncode}: {tail}"})
        else:
            answers.append(json.loads(lines[-1]))
    return answers


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE_KIB


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:  # loopback only
        body: bytes = response.read()
    return body.decode()


def app_histogram(
    text: str, name: str, application_name: str
) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative (le, count) buckets, sum, count) of one histogram for one application_name,
    summed over pools."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.labels.get("application_name") != application_name:
                continue
            if sample.name == name + "_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == name + "_sum":
                total += sample.value
            elif sample.name == name + "_count":
                count += sample.value
    return sorted(buckets.items()), total, count


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style: linear inside the bucket the rank falls in."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower_bound
            width = cumulative - lower_count
            fraction = (rank - lower_count) / width if width else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, cumulative
    return lower_bound


# -- scenarios -------------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    """The running system: PostgreSQL, the two proxies, and where the results go."""

    postgres: EmbeddedPostgres
    workdir: Path
    pgbouncer_binary: str
    proxies: list[Proxy]
    metrics_url: str
    steps: Steps
    http_port: int = 0  # pypooler's HTTP listener, when httpfanout runs
    wsproxy: Proxy | None = None  # the plain WebSocket-to-TCP relay, when httpfanout runs

    def targets(self, *, with_pgbouncer: bool = True) -> list[tuple[str, int, Proxy | None]]:
        pgbouncer, pypooler = self.proxies[0], self.proxies[1]
        targets: list[tuple[str, int, Proxy | None]] = [("direct", self.postgres.port, None)]
        if with_pgbouncer:
            targets.append(("PgBouncer", pgbouncer.port, pgbouncer))
        targets.append(("pypooler", pypooler.port, pypooler))
        return targets

    def before_direct(self, run: Run, label: str) -> None:
        note = compare.wait_for_drained_pools(self.postgres)
        if note is not None:
            run.notes.append(f"{label}: direct started with {note}")


def fanout_scenario(bench: Bench, run: Run, round_no: int) -> None:
    for n in run.scale.fanout_ns:
        for target, port, proxy in bench.targets():
            if proxy is None:
                bench.before_direct(run, f"fanout N={n} round {round_no}")

            def commands(start_at: float, shares: list[int], port: int = port) -> list[list[str]]:
                params = {
                    "host": LOOPBACK, "port": port, "user": SUPERUSER, "database": DEFAULT_DBNAME,
                    "timeout_s": FANOUT_TIMEOUT_S, "start_at": start_at, "application_name": "bench-fanout",
                }  # fmt: skip
                return [
                    [sys.executable, "-m", "bench.loadgen", "fanout", json.dumps({**params, "n": share})]
                    for share in shares
                ]

            result = fanout_bursts(bench, run, "fanout", round_no, target, n, commands, proxy)
            run.fanout.append(result)


def http_fanout_scenario(bench: Bench, run: Run, round_no: int) -> None:
    """The driver's two transports: neon() over POST /sql, Client over a WebSocket (the plain
    relay, and pypooler's). Every target logs in by trust, so the WebSocket Client runs with
    pipelineConnect false: its default pipelines a cleartext password, which only
    auth_type = plain takes (PostgreSQL under trust refuses it, as pypooler does)."""
    assert bench.wsproxy is not None and bench.http_port
    connection_string = f"postgresql://{SUPERUSER}:{NEON_PASSWORD}@{LOOPBACK}/{DEFAULT_DBNAME}"
    targets = [
        (HTTP_DIRECT, {"mode": "ws", "ws": f"{LOOPBACK}:{bench.wsproxy.port}", "pipeline": "false"}),
        (HTTP_SQL, {"mode": "http", "endpoint": f"http://{LOOPBACK}:{bench.http_port}/sql"}),
        (HTTP_WS, {"mode": "ws", "ws": f"{LOOPBACK}:{bench.http_port}", "pipeline": "false"}),
    ]
    for n in run.scale.http_fanout_ns:
        for target, transport in targets:
            if target == HTTP_DIRECT:
                bench.before_direct(run, f"httpfanout N={n} round {round_no}")

            def commands(
                start_at: float, shares: list[int], transport: dict[str, str] = transport
            ) -> list[list[str]]:
                return [
                    ["node", "--experimental-websocket", "--no-warnings", str(NEON_FANOUT_SCRIPT),
                     json.dumps({
                         **transport, "driver": str(NEON_DRIVER_DIR), "connection_string": connection_string,
                         "n": share, "start_at": start_at, "timeout_s": FANOUT_TIMEOUT_S,
                     })]
                    for share in shares
                ]  # fmt: skip

            proxy = bench.wsproxy if target == HTTP_DIRECT else bench.proxies[1]
            result = fanout_bursts(bench, run, "httpfanout", round_no, target, n, commands, proxy)
            run.http_fanout.append(result)


def fanout_bursts(
    bench: Bench,
    run: Run,
    scenario: str,
    round_no: int,
    target: str,
    n: int,
    commands: Callable[[float, list[int]], list[list[str]]],
    proxy: Proxy | None,
) -> LoadResult:
    """`fanout_bursts` bursts of n invocations against one target, from `fanout_client_procs`
    processes that `commands(start_at, shares)` starts; merged into one LoadResult, with the
    CPU time the proxy (or relay) in front of PostgreSQL spent over the bursts."""
    scale = run.scale
    result = LoadResult(scenario, round_no, target, f"N={n}")
    cpu_before = compare.process_cpu_seconds(proxy.pid) if proxy is not None else None
    procs = min(scale.fanout_client_procs, n)
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    for burst in range(scale.fanout_bursts):
        start_at = time.time() + FANOUT_START_DELAY_S
        answers = run_clients(scenario, commands(start_at, shares), FANOUT_TIMEOUT_S + LOADGEN_GRACE_S)
        for answer in answers:
            if "failed" in answer:
                run.notes.append(
                    f"{scenario} N={n} round {round_no} {target} burst {burst + 1}: {answer['failed']}"
                )
                continue
            result.ok += answer["ok"]
            result.errors.update(answer["errors"])
            result.latencies.extend(answer["latencies"])
            if answer["start_lag_s"] > 0.5:
                run.notes.append(
                    f"{scenario} N={n} round {round_no} {target}: a client process started"
                    f" {answer['start_lag_s']:.1f} s late"
                )
        result.offered += n
        result.wall_s += max((a.get("wall_s", 0.0) for a in answers), default=0.0)
    result.latencies.sort()
    if cpu_before is not None and proxy is not None and proxy.alive():
        result.extra["proxy_cpu_s"] = compare.process_cpu_seconds(proxy.pid) - cpu_before
    p99 = result.quantile(0.99)
    bench.steps.report(
        f"{scenario} N={n} round {round_no} {target}: {result.success:.1%} ok, "
        f"p99 {'-' if p99 is None else f'{p99 * 1000:.0f} ms'}, {result.throughput:,.0f}/s"
        + (f", errors: {dict(result.errors.most_common(2))}" if result.errors else "")
    )
    return result


def pools_result(scenario: str, round_no: int, target: str, point: str, answer: dict[str, Any]) -> LoadResult:
    result = LoadResult(scenario, round_no, target, point)
    if "failed" in answer:
        result.errors["run failed: " + answer["failed"]] += 1
        return result
    result.offered = answer["arrived"]
    result.ok = answer["ok"]
    result.errors.update(answer["errors"])
    if answer["shed"]:
        result.errors["shed by the load generator (in-flight cap)"] += answer["shed"]
    result.latencies = answer["latencies"]
    result.wall_s = answer["wall_s"]
    result.extra["pg_samples"] = answer["pg_samples"]
    result.extra["metrics_samples"] = answer["metrics_samples"]
    return result


def autoscale_scenario(bench: Bench, run: Run, round_no: int) -> None:
    scale = run.scale
    for target, port, proxy in bench.targets(with_pgbouncer=False):
        if proxy is None:
            bench.before_direct(run, f"autoscale round {round_no}")
        params = {
            **AUTOSCALE, "host": LOOPBACK, "port": port, "user": SUPERUSER,
            "database": DEFAULT_DBNAME, "pg_host": bench.postgres.host, "pg_port": bench.postgres.port,
            "rate": scale.autoscale_rate, "duration_s": scale.autoscale_duration_s,
            "application_name": f"bench-autoscale-r{round_no}", "seed": round_no,
        }  # fmt: skip
        timeout = scale.autoscale_duration_s + AUTOSCALE["request_timeout_s"] + LOADGEN_GRACE_S
        answer = run_loadgen("pools", params, timeout)
        result = pools_result("autoscale", round_no, target, "12 x 25", answer)
        run.autoscale.append(result)
        p99 = result.quantile(0.99)
        peak = max((s[1] for s in result.extra.get("pg_samples", [])), default=0)
        bench.steps.report(
            f"autoscale round {round_no} {target}: {result.ok}/{result.offered} ok, "
            f"{sum(result.errors.values())} errors, p99 {'-' if p99 is None else f'{p99 * 1000:.0f} ms'}, "
            f"peak {peak:.0f} server connections"
        )


def hold_scenario(bench: Bench, run: Run, round_no: int) -> None:
    scale = run.scale
    pypooler = bench.proxies[1]
    for hold_s in HOLD_TIMES_S:
        app = f"bench-hold-{hold_s * 1000:.0f}ms-r{round_no}"
        params = {
            **HOLD, "xact_hold_s": hold_s, "host": LOOPBACK, "port": pypooler.port, "user": SUPERUSER,
            "database": DEFAULT_DBNAME, "pg_host": bench.postgres.host, "pg_port": bench.postgres.port,
            "rate": scale.hold_rate, "duration_s": scale.hold_duration_s, "application_name": app,
            "metrics_url": bench.metrics_url, "seed": round_no,
        }  # fmt: skip
        timeout = scale.hold_duration_s + HOLD["request_timeout_s"] + LOADGEN_GRACE_S
        answer = run_loadgen("pools", params, timeout)
        result = pools_result("hold", round_no, "pypooler", f"hold {hold_s * 1000:.0f} ms", answer)
        result.extra["hold_target_s"] = hold_s
        result.extra["rate"] = scale.hold_rate
        with contextlib.suppress(OSError):
            text = scrape(bench.metrics_url)
            for key, metric in (
                ("wait", "pypooler_checkout_wait_seconds"),
                ("hold", "pypooler_hold_seconds"),
            ):
                buckets, total, count = app_histogram(text, metric, app)
                result.extra[key] = {"buckets": buckets, "sum": total, "count": count}
        run.hold.append(result)
        wait = result.extra.get("wait", {})
        p99 = histogram_quantile(wait.get("buckets", []), 0.99)
        bench.steps.report(
            f"hold {hold_s * 1000:.0f} ms round {round_no}: {result.ok}/{result.offered} ok, "
            f"pypooler p99 checkout wait {'-' if p99 is None else f'{p99 * 1000:.1f} ms'}"
        )


def pgbench_scenario(bench: Bench, run: Run, round_no: int) -> None:
    scale = run.scale
    for point in scale.pgbench_points:
        for target, port, proxy in bench.targets():
            if proxy is None:
                bench.before_direct(run, f"pgbench {point.label} round {round_no}")
            result = compare.run_pgbench(
                bench.postgres, port, point, duration_s=scale.pgbench_duration_s,
                threads=compare.DEFAULT_THREADS,
                proxy=proxy, round_no=round_no, target=target,
            )  # fmt: skip
            run.pgbench.append(result)
            if result.ok:
                cpu = result.cpu_us_per_xact
                summary = f"{result.tps:,.0f} tps" + ("" if cpu is None else f", {cpu:.1f} µs/xact")
            else:
                summary = f"FAILED: {result.error}"
            bench.steps.report(f"pgbench {point.label} round {round_no} {target}: {summary}")


def idle_scenario(bench: Bench, run: Run, round_no: int) -> None:
    """Fresh proxies each round, so memory freed by earlier scenarios cannot be reused and
    hide the cost of the idle clients."""
    for target in ("PgBouncer", "pypooler"):
        name = f"{target}-idle-r{round_no}"
        if target == "PgBouncer":
            proxy = compare.start_pgbouncer(
                bench.workdir,
                bench.postgres,
                bench.pgbouncer_binary,
                name=name,
                settings=pgbouncer_settings(),
            )
        else:
            proxy = compare.start_pypooler(
                bench.workdir, bench.postgres, name=name, settings=pypooler_settings(0)
            )
        bench.proxies.append(proxy)
        try:
            run.idle.append(measure_idle(bench, run, proxy, target, round_no))
        finally:
            proxy.stop()
        result = run.idle[-1]
        per = result.kib_per_client
        bench.steps.report(
            f"idle round {round_no} {target}: {result.ok}/{result.clients} clients, "
            f"RSS {result.rss_before_kib / 1024:.1f} -> {result.rss_after_kib / 1024:.1f} MiB"
            + ("" if per is None else f", {per:.1f} KiB per client")
        )


def measure_idle(bench: Bench, run: Run, proxy: Proxy, target: str, round_no: int) -> IdleResult:
    n = run.scale.idle_clients
    params = {
        "host": LOOPBACK, "port": proxy.port, "user": SUPERUSER, "database": DEFAULT_DBNAME, "n": n,
        "sources": list(IDLE_SOURCES), "concurrency": IDLE_LOGIN_CONCURRENCY, "timeout_s": IDLE_TIMEOUT_S,
        "hold_s": IDLE_TIMEOUT_S + LOADGEN_GRACE_S,
    }  # fmt: skip
    time.sleep(IDLE_SETTLE_S)
    before = rss_kib(proxy.pid)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "idle", json.dumps(params)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=loadgen_env(),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], IDLE_TIMEOUT_S * 4)
        line = proc.stdout.readline() if ready else ""
        if not line:
            run.notes.append(f"idle round {round_no} {target}: the clients never reported")
            return IdleResult(round_no, target, n, 0, before, before, 0.0, {"no report": 1})
        report = json.loads(line)
        time.sleep(IDLE_SETTLE_S)
        after = rss_kib(proxy.pid)
        proc.stdin.write("release\n")
        proc.stdin.flush()
        return IdleResult(
            round_no, target, n, report["ok"], before, after, report["login_s"], report["errors"]
        )
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            proc.wait(timeout=LOADGEN_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


# -- main ------------------------------------------------------------------------------------


# pypooler's hog detection names the holders when a client waited long: the hold scenario's
# 200 ms holds are meant to trigger it, so those lines are counted apart from real trouble.
HOG_DETECTION_RE = re.compile(r"waited \d+ ms for a server|idle in transaction|held \d+ ms")


def proxy_log_notes(proxies: Sequence[Proxy]) -> list[str]:
    notes: list[str] = []
    for proxy in proxies:
        notes += [f"- {proxy.name}: {note}" for note in proxy.exit_notes]
        lines = compare.read_tail(proxy.log_path, 100_000).splitlines()
        trouble = [line for line in lines if compare._PROXY_LOG_TROUBLE_RE.search(line)]
        hog = [line for line in trouble if HOG_DETECTION_RE.search(line)]
        other = [line for line in trouble if not HOG_DETECTION_RE.search(line)]
        if hog:
            notes.append(
                f"- {proxy.name} log: {len(hog)} hog-detection warnings (expected wherever clients"
                " queue for the pool: the big fan-outs and the 200 ms holds), e.g."
                f" `{compare.short(hog[0], 300)}`"
            )
        if other:
            notes.append(f"- {proxy.name} log: {len(other)} other warning/error lines, first ones:")
            notes += [f"  - `{compare.short(line, 300)}`" for line in other[:5]]
    return notes


def pypooler_settings(metrics_port: int, http_port: int = 0) -> dict[str, str | int | float | bool]:
    settings: dict[str, str | int | float | bool] = {
        "max_client_conn": BENCH_MAX_CLIENT_CONN,
        "stats_max_applications": STATS_MAX_APPLICATIONS,
        "metrics_port": metrics_port,
    }
    if http_port:
        settings.update(http_listen_addr=LOOPBACK, http_listen_port=http_port)
    return settings


def ensure_neon_driver() -> None:
    """tests/node with the driver installed, as test_neon_driver.py's fixture does it."""
    if (NEON_DRIVER_DIR / "index.mjs").is_file():
        return
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("httpfanout needs node and npm (the @neondatabase/serverless driver)")
    progress(f"npm install in {NODE_DIR} (@neondatabase/serverless)")
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund"],
        cwd=NODE_DIR, check=True, capture_output=True, timeout=NPM_TIMEOUT_S,
    )  # fmt: skip


def start_wsproxy(workdir: Path, postgres: EmbeddedPostgres) -> Proxy:
    """bench.wsproxy in front of PostgreSQL, on a port the OS picks (it prints it)."""
    log_path = workdir / "wsproxy.stderr"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.wsproxy",
             "--pg-host", postgres.host, "--pg-port", str(postgres.port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=loadgen_env(),
            start_new_session=True,
        )  # fmt: skip
    proxy = Proxy("wsproxy", process, 0, log_path, signal.SIGINT, frozenset({0}))
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], WSPROXY_START_TIMEOUT_S)
    line = process.stdout.readline().decode() if ready else ""
    process.stdout.close()
    if not line.startswith("listening "):
        proxy.stop()
        raise RuntimeError(f"bench.wsproxy did not start: {compare.read_tail(log_path)}")
    proxy.port = int(line.split()[1])
    progress(f"wsproxy is up on {LOOPBACK}:{proxy.port} (pid {proxy.pid})")
    return proxy


def pgbouncer_settings() -> dict[str, str | int]:
    return {"max_client_conn": BENCH_MAX_CLIENT_CONN, "listen_backlog": LISTEN_BACKLOG}


def count_steps(scale: Scale, scenarios: Sequence[str], rounds: int) -> int:
    per_round = {
        "fanout": len(scale.fanout_ns) * 3,
        "httpfanout": len(scale.http_fanout_ns) * 3,
        "autoscale": 2,
        "hold": len(HOLD_TIMES_S),
        "pgbench": len(scale.pgbench_points) * 3,
        "idle": 2,
    }
    return rounds * sum(per_round[name] for name in scenarios)


def describe_machine(postgres: EmbeddedPostgres, pgbouncer_binary: str) -> str:
    versions = []
    for package in ("asyncpg", "matplotlib"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    return compare.describe_machine(postgres, pgbouncer_binary) + "; " + ", ".join(versions)


def benchmark(args: argparse.Namespace) -> tuple[Run, str, float, datetime.datetime]:
    scale: Scale = QUICK if args.quick else FULL
    if args.fanout:
        scale = dataclasses.replace(scale, fanout_ns=tuple(args.fanout))
    if args.http_fanout:
        scale = dataclasses.replace(scale, http_fanout_ns=tuple(args.http_fanout))
    if args.idle_clients:
        scale = dataclasses.replace(scale, idle_clients=args.idle_clients)
    run = Run(scale=scale, rounds=args.rounds)
    scenarios: list[str] = args.scenarios
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    load_start = os.getloadavg()[0]
    postgres = EmbeddedPostgres(max_connections=compare.PG_MAX_CONNECTIONS)
    workdir = Path(tempfile.mkdtemp(prefix="pypooler-bench-"))
    os.chmod(workdir, 0o755)  # PgBouncer, as nobody, must reach its subdirectory
    proxies: list[Proxy] = []
    machine = "?"
    try:
        progress(f"starting PostgreSQL (max_connections {compare.PG_MAX_CONNECTIONS})")
        postgres.start()
        progress(
            f"PostgreSQL is up on {postgres.host}:{postgres.port}; pgbench -i -s {compare.DEFAULT_SCALE}"
        )
        compare.pgbench_init(postgres, compare.DEFAULT_SCALE)
        proxies.append(
            compare.start_pgbouncer(workdir, postgres, args.pgbouncer, settings=pgbouncer_settings())
        )
        metrics_port = random_free_port()
        http_port = 0
        if "httpfanout" in scenarios:
            ensure_neon_driver()
            http_port = random_free_port()
        proxies.append(
            compare.start_pypooler(workdir, postgres, settings=pypooler_settings(metrics_port, http_port))
        )
        wsproxy = start_wsproxy(workdir, postgres) if http_port else None
        if wsproxy is not None:
            proxies.append(wsproxy)
        machine = describe_machine(postgres, args.pgbouncer)
        progress(f"machine: {machine}; load average {load_start:.2f}")
        bench = Bench(
            postgres,
            workdir,
            args.pgbouncer,
            proxies,
            f"http://{LOOPBACK}:{metrics_port}",
            Steps(count_steps(scale, scenarios, args.rounds)),
            http_port,
            wsproxy,
        )
        functions = {
            "fanout": fanout_scenario, "httpfanout": http_fanout_scenario,
            "autoscale": autoscale_scenario, "hold": hold_scenario,
            "pgbench": pgbench_scenario, "idle": idle_scenario,
        }  # fmt: skip
        for name in scenarios:
            for round_no in range(1, args.rounds + 1):
                functions[name](bench, run, round_no)
        for proxy in proxies:
            proxy.stop()
        run.notes += compare.render_notes(run.pgbench, [], [])
        run.notes += proxy_log_notes(proxies)
    finally:
        for proxy in reversed(proxies):
            try:
                proxy.stop()
            except Exception as exc:
                progress(f"stopping {proxy.name} (pid {proxy.pid}) failed: {exc}")
        try:
            postgres.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return run, f"{machine}; load average {load_start:.2f} at start", time.monotonic() - clock, started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-minute run at smaller scale")
    parser.add_argument(
        "--scenarios", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        default=list(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f"rounds (at least {MIN_ROUNDS})")
    parser.add_argument(
        "--fanout", type=lambda text: [int(n) for n in text.split(",")],
        help="fan-out sizes, e.g. 100,1000,5000",
    )  # fmt: skip
    parser.add_argument(
        "--http-fanout", type=lambda text: [int(n) for n in text.split(",")],
        help="HTTP/WebSocket fan-out sizes, e.g. 1000,5000",
    )  # fmt: skip
    parser.add_argument("--idle-clients", type=int, help="idle clients for the memory test")
    parser.add_argument("--pgbouncer", default=compare.PGBOUNCER, help="PgBouncer binary")
    parser.add_argument(
        "--results-dir", type=Path, default=Path(__file__).resolve().parent / "results",
        help="the report goes to DIR/<date>_<time>/",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {','.join(SCENARIOS)}")
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}: one round cannot show its own noise")
    return args


def jsonable(value: object) -> object:
    """json.dumps' fallback: dataclasses field by field (dataclasses.asdict would rebuild a
    Counter from pairs and count the pairs), anything else as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compare.exit_cleanly_on_sigterm()
    compare.raise_fd_limit()
    run, machine, elapsed_s, started = benchmark(args)
    out_dir: Path = args.results_dir / f"{started:%Y-%m-%d_%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    from bench import report  # matplotlib is imported only once there is something to draw

    # The raw measurements too, so a report can be checked or re-plotted later.
    (out_dir / "run.json").write_text(json.dumps(run, default=jsonable))
    text = report.write(run, out_dir, machine=machine, elapsed_s=elapsed_s, started=started, quick=args.quick)
    print(text, end="")
    progress(f"wrote {out_dir / 'report.md'} and its plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
