"""HTTP `SELECT 1` requests/s through pypooler against `pgbench -S` over TCP: `python -m
bench.http_speed [--clients 10,100] [--rounds 3] [--duration 8]`.

Issue 18's speed goal: `POST /sql` requests per second through pypooler at least 0.5x of
`pgbench -S` transactions per second over TCP through pypooler, on the same machine, with
pypooler's CPU per request reported for both. The HTTP load is `wrk` (keep-alive connections, a
Lua script making each request the one `neon()` sends for `SELECT 1`: POST, its JSON body, its
Neon-* headers), so the client is not what limits; pgbench -S runs as bench.compare runs it (its
runner), and also straight to PostgreSQL for reference. Both at the same client count (wrk -c,
pgbench -c, 2 threads each).

Two pypooler processes (bench.compare's settings: transaction mode, pool_size 20, connection
logging off), each with its HTTP listener:
- trust: what bench.compare uses (the superuser, trusted); the password in the request's
  connection string is not checked.
- SCRAM: auth_type hba, the superuser trusted (for the start-up check) and `pp_scram` by
  scram-sha-256 against the SCRAM verifier PostgreSQL stores for it in auth_file, as
  bench.auth_connect sets it up. pgbench logs in by SCRAM once per connection; every /sql
  request checks the connection string's password against the verifier (PBKDF2, 4096 rounds,
  unless pypooler caches checked passwords).

Rules: measures and prints, never asserts. Every round runs every row back to back, the
order of pgbench and HTTP flipped every round (a shared machine's load drifts), and ratios are
taken within a round. Everything listens on 127.0.0.1 (ports below 32768); every process is
stopped by its PID; wrk and pgbench are bounded by --duration plus a grace period. The report
goes to stdout and to bench/results/http-speed-<UTC time>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import compare
from bench.compare import LOOPBACK, Point, Proxy, progress
from pypooler.embedded import DEFAULT_DBNAME, SUPERUSER, EmbeddedPostgres, random_free_port

DEFAULT_CLIENTS = (10, 100)
DEFAULT_ROUNDS = 3
DEFAULT_DURATION_S = 8
THREADS = 2  # wrk -t and pgbench -j: one per core on the 2-core machines we run on
WARMUP_S = 2
WRK = "wrk"
PY_SPY = Path(sys.executable).parent / "py-spy"
PROFILE_RATE_HZ = 250
PROFILE_TOP = 15
WRK_GRACE_S = 60
SCRAM_USER = "pp_scram"  # a role pypooler.embedded creates, SCRAM in PostgreSQL's pg_hba
GOAL = 0.5  # issue 18: HTTP requests/s >= 0.5 x pgbench -S transactions/s
PREFLIGHT_TIMEOUT_S = 10
AUTHS = ("trust", "SCRAM")
DIRECT, PGBENCH, HTTP = "pgbench -S direct", "pgbench -S", "HTTP /sql"

_REQUESTS_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(\w+)", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS_RE = re.compile(r"Socket errors: (.+)")
_PERCENTILE_RE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(slots=True)
class Measurement:
    """One run: pgbench's transactions or wrk's requests, and pypooler's CPU over it."""

    round_no: int
    clients: int
    auth: str
    target: str
    rate: float | None = None  # tps or requests/s
    count: int | None = None
    cpu_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    error: str | None = None

    @property
    def cpu_us(self) -> float | None:
        if self.error or self.cpu_s is None or not self.count:
            return None
        return self.cpu_s / self.count * 1e6


# -- set-up ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    """One pypooler under test, and how its clients log in."""

    auth: str
    proxy: Proxy
    http_port: int
    user: str
    password: str


def start_targets(workdir: Path, postgres: EmbeddedPostgres) -> list[Target]:
    targets: list[Target] = []
    http_port = random_free_port()
    listener: dict[str, str | int | float | bool] = {
        "http_listen_addr": LOOPBACK,
        "http_listen_port": http_port,
    }
    proxy = compare.start_pypooler(workdir, postgres, name="pypooler-trust", settings=listener)
    targets.append(Target("trust", proxy, http_port, SUPERUSER, "x"))
    password = postgres.password_of(SCRAM_USER)
    assert password is not None
    verifier = postgres.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_USER}'")
    home = workdir / "scram-auth"
    home.mkdir(mode=0o700)
    auth_file, hba_file = home / "userlist.txt", home / "hba.conf"
    auth_file.write_text(f'"{SCRAM_USER}" "{verifier}"\n')
    # The superuser stays trusted: bench.compare's start-up check logs in as it.
    hba_file.write_text(
        f"host all {SUPERUSER} 127.0.0.1/32 trust\nhost all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n"
    )
    http_port = random_free_port()
    settings: dict[str, str | int | float | bool] = {
        **listener, "http_listen_port": http_port,
        "auth_type": "hba", "auth_hba_file": str(hba_file), "auth_file": str(auth_file),
    }  # fmt: skip
    proxy = compare.start_pypooler(workdir, postgres, name="pypooler-scram", settings=settings)
    targets.append(Target("SCRAM", proxy, http_port, SCRAM_USER, password))
    return targets


def connection_string(target: Target) -> str:
    return f"postgresql://{target.user}:{target.password}@{LOOPBACK}/{DEFAULT_DBNAME}"


def neon_headers(target: Target) -> dict[str, str]:
    """The headers neon() sends with a query (driver 1.2)."""
    return {
        "Content-Type": "text/plain;charset=UTF-8",  # fetch's type for a string body
        "Neon-Connection-String": connection_string(target),
        "Neon-Raw-Text-Output": "true",
        "Neon-Array-Mode": "true",
    }


NEON_BODY = json.dumps({"query": "SELECT 1", "params": []})


def neon_request_lua(target: Target) -> str:
    """wrk's script: every request the one neon() sends for `SELECT 1`."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(NEON_BODY)}"]
    lines += [
        f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}"
        for name, value in neon_headers(target).items()
    ]
    return "\n".join(lines) + "\n"


def preflight(target: Target) -> None:
    """One request by hand: the setup answers `SELECT 1` (else every wrk figure is of errors)."""
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{target.http_port}/sql",
        data=NEON_BODY.encode(),
        method="POST",
        headers=neon_headers(target),
    )
    with urllib.request.urlopen(request, timeout=PREFLIGHT_TIMEOUT_S) as response:  # loopback only
        answer = json.loads(response.read())
    if answer.get("rows") != [["1"]]:
        raise RuntimeError(f"{target.proxy.name}: POST /sql answered {answer!r}")


# -- runs ------------------------------------------------------------------------------------


def run_wrk(target: Target, script: Path, clients: int, duration_s: int, round_no: int) -> Measurement:
    result = Measurement(round_no, clients, target.auth, HTTP)
    argv = [
        WRK, "-t", str(min(THREADS, clients)), "-c", str(clients), "-d", f"{duration_s}s",
        "--latency", "-s", str(script), f"http://{LOOPBACK}:{target.http_port}/sql",
    ]  # fmt: skip
    cpu_before = compare.process_cpu_seconds(target.proxy.pid)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S, check=False
        )
    except subprocess.TimeoutExpired:
        result.error = f"wrk hung: no result {duration_s + WRK_GRACE_S} s after start (killed)"
        return result
    result.cpu_s = compare.process_cpu_seconds(target.proxy.pid) - cpu_before
    if done.returncode != 0:
        result.error = f"wrk exit {done.returncode}: {compare.short(done.stderr.strip() or done.stdout, 200)}"
        return result
    parse_wrk(done.stdout, result)
    return result


def parse_wrk(stdout: str, result: Measurement) -> None:
    """wrk --latency's report into `result`: requests, requests/s, p50 and p99, and as the
    error any non-2xx responses or socket errors (the rate then counts failures too)."""
    requests, rate = _REQUESTS_RE.search(stdout), _RPS_RE.search(stdout)
    if requests is None or rate is None:
        result.error = f"no result in wrk's output: {compare.short(stdout, 200)}"
        return
    result.count, result.rate = int(requests.group(1)), float(rate.group(1))
    for percentile, value, unit in _PERCENTILE_RE.findall(stdout):
        ms = float(value) * _UNIT_MS[unit]
        if percentile == "50":
            result.p50_ms = ms
        else:
            result.p99_ms = ms
    failures = [m.group(0) for m in (_NON_2XX_RE.search(stdout), _SOCKET_ERRORS_RE.search(stdout)) if m]
    if failures:
        result.error = "; ".join(failures)


def run_pgbench(
    postgres: EmbeddedPostgres, target: Target | None, clients: int, duration_s: int, round_no: int
) -> Measurement:
    proxy = None if target is None else target.proxy
    result = Measurement(round_no, clients, "trust" if target is None else target.auth, PGBENCH)
    if target is None:
        result.target = DIRECT
    run = compare.run_pgbench(
        postgres, postgres.port if proxy is None else proxy.port, Point(clients, reconnect=False),
        duration_s=duration_s, threads=THREADS, proxy=proxy, round_no=round_no, target=result.target,
        user=None if target is None or target.user == SUPERUSER else target.user,
    )  # fmt: skip
    result.rate, result.count, result.cpu_s, result.error = run.tps, run.xacts, run.proxy_cpu_s, run.error
    if run.latency_ms is not None:
        result.p50_ms = run.latency_ms  # pgbench reports the mean; the table says so
    return result


def measure(args: argparse.Namespace, workdir: Path) -> tuple[list[Measurement], str]:
    results: list[Measurement] = []
    load_start = os.getloadavg()[0]
    with EmbeddedPostgres(max_connections=compare.PG_MAX_CONNECTIONS) as postgres:
        progress(
            f"PostgreSQL is up on {postgres.host}:{postgres.port}; pgbench -i -s {compare.DEFAULT_SCALE}"
        )
        compare.pgbench_init(postgres, compare.DEFAULT_SCALE)
        postgres.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {SCRAM_USER}")
        targets: list[Target] = []
        try:
            targets = start_targets(workdir, postgres)
            machine = compare.describe_machine(postgres, compare.PGBOUNCER) + f"; {command_line([WRK, '-v'])}"
            progress(f"machine: {machine}; load average {load_start:.2f}")
            scripts = {}
            for target in targets:
                preflight(target)
                scripts[target.auth] = workdir / f"neon-{target.auth}.lua"
                scripts[target.auth].write_text(neon_request_lua(target))
                # Both pools open their servers before anything is measured.
                run_pgbench(postgres, target, max(args.clients), WARMUP_S, 0)
                run_wrk(target, scripts[target.auth], max(args.clients), WARMUP_S, 0)
            for round_no in range(1, args.rounds + 1):
                for clients in args.clients:
                    note = compare.wait_for_drained_pools(postgres)
                    if note is not None:
                        progress(f"direct c={clients} round {round_no} starts with {note}")
                    results.append(run_pgbench(postgres, None, clients, args.duration, round_no))
                    report_progress(results[-1])
                    for target in targets:
                        pair = ["pgbench", "http"] if round_no % 2 else ["http", "pgbench"]
                        for kind in pair:
                            if kind == "http":
                                measured = run_wrk(
                                    target, scripts[target.auth], clients, args.duration, round_no
                                )
                            else:
                                measured = run_pgbench(postgres, target, clients, args.duration, round_no)
                            results.append(measured)
                            report_progress(measured)
            if args.profile is not None:
                for target in targets:
                    for kind in ("http", "pgbench"):
                        profile(postgres, target, kind, scripts[target.auth], args, results)
        finally:
            for target in targets:
                target.proxy.stop()
    return results, f"{machine}; load average {load_start:.2f} at start"


def profile(
    postgres: EmbeddedPostgres,
    target: Target,
    kind: str,
    script: Path,
    args: argparse.Namespace,
    results: list[Measurement],
) -> None:
    """py-spy (native frames too: the hot path is mypyc-compiled) on pypooler while one more
    run at the first client count loads it; the collapsed stacks go to --profile, and
    `profile_summary` reads them. The run is not part of the table (py-spy slows it)."""
    out: Path = args.profile
    out.mkdir(parents=True, exist_ok=True)
    stacks = out / f"{target.auth}-{kind}-c{args.clients[0]}.txt"
    spy = subprocess.Popen(
        [str(PY_SPY), "record", "--native", "--rate", str(PROFILE_RATE_HZ), "--format", "raw",
         "--duration", str(args.duration), "--pid", str(target.proxy.pid), "-o", str(stacks)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if kind == "http":
        measured = run_wrk(target, script, args.clients[0], args.duration, 0)
    else:
        measured = run_pgbench(postgres, target, args.clients[0], args.duration, 0)
    try:
        _, err = spy.communicate(timeout=args.duration + WRK_GRACE_S)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    measured.target = f"profiled {measured.target}"
    results.append(measured)
    report_progress(measured)
    if spy.returncode != 0 or not stacks.is_file():
        progress(f"py-spy failed ({spy.returncode}): {compare.short(err.strip(), 300)}")
        return
    progress(f"collapsed stacks in {stacks}")
    print(profile_summary(stacks, measured), file=sys.stderr)


def profile_summary(stacks: Path, measured: Measurement) -> str:
    """Where pypooler's CPU per request goes, from py-spy's collapsed stacks: samples waiting in
    epoll are idle and left out; every other sample is a share of the CPU per request. By
    function (the frame on top of the stack) and by source file (the innermost Python or
    mypyc-compiled frame, so a `write` counts for the code that called it)."""
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    busy = idle = 0
    for line in stacks.read_text().splitlines():
        frames_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(frame) for frame in frames_text.split(";")]
        if frames[-1][0] in IDLE_FRAMES:
            idle += count
            continue
        busy += count
        own[f"{frames[-1][0]} ({frames[-1][1]})"] += count
        files[next((where for _, where in reversed(frames) if is_source(where)), frames[-1][1])] += count
    per_request = measured.cpu_us or 0.0
    lines = [
        f"{stacks.name}: {busy} busy samples ({idle} idle left out);"
        f" {per_request:.1f} µs pypooler CPU per request (with py-spy attached)"
    ]
    for title, counter in (("function", own), ("source file", files)):
        lines.append(f"  top {PROFILE_TOP} by {title}: share of busy samples, µs per request")
        for name, count in counter.most_common(PROFILE_TOP):
            share = count / busy if busy else 0.0
            lines.append(f"    {share:6.1%} {share * per_request:7.1f}  {name}")
    return "\n".join(lines)


IDLE_FRAMES = frozenset({"epoll_pwait", "epoll_wait"})
_MYPYC_SYMBOL_RE = re.compile(r"CPyDef_(?:([a-z_]+)___)?")


def parse_frame(frame: str) -> tuple[str, str]:
    """("function", "where") of one py-spy frame "function (path:line)"; a mypyc function's
    "where" is its module (`CPyDef_client___...` is pypooler/client, compiled)."""
    function, _, rest = frame.partition(" (")
    where = rest.rstrip(")").rsplit(":", 1)[0]
    where = "/".join(where.split("/")[-2:])
    symbol = _MYPYC_SYMBOL_RE.match(function)
    if symbol is not None and symbol.group(1):
        where = f"{symbol.group(1).replace('___', '/')}.py (compiled)"
    return function, where


def is_source(where: str) -> bool:
    return where.endswith((".py", ".py (compiled)"))


def command_line(argv: Sequence[str]) -> str:
    """wrk -v prints its version on the first line (and exits 1)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"{argv[0]}: {exc}"
    text = out.stdout or out.stderr
    return text.splitlines()[0].strip() if text else argv[0]


def report_progress(result: Measurement) -> None:
    cpu = result.cpu_us
    progress(
        f"round {result.round_no} c={result.clients} {result.auth} {result.target}: "
        + (f"{result.rate:,.0f}/s" if result.rate is not None else "no rate")
        + ("" if cpu is None else f", {cpu:.1f} µs CPU each")
        + ("" if result.error is None else f" [{result.error}]")
    )


# -- report ----------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rounds_of(results: Sequence[Measurement], clients: int, auth: str, target: str) -> list[Measurement]:
    chosen = (r for r in results if r.clients == clients and r.auth == auth and r.target == target)
    return sorted(chosen, key=lambda r: r.round_no)


def render_table(results: Sequence[Measurement], clients_list: Sequence[int]) -> str:
    lines = [
        "| c | auth | pgbench -S direct, tps | pgbench -S via pypooler, tps | µs CPU/xact"
        " | HTTP `SELECT 1`, req/s | µs CPU/req | HTTP p50 / p99 ms | HTTP ÷ pgbench -S (per round)"
        f" | goal {GOAL} |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for clients in clients_list:
        direct = median(
            [r.rate for r in results if r.clients == clients and r.target == DIRECT and not r.error]
        )
        for auth in AUTHS:
            pgbench, http = (
                rounds_of(results, clients, auth, PGBENCH),
                rounds_of(results, clients, auth, HTTP),
            )
            by_round = {r.round_no: r for r in pgbench if r.rate and not r.error}
            ratios = [
                h.rate / by_round[h.round_no].rate  # type: ignore[operator]
                if h.rate is not None and h.round_no in by_round
                else None
                for h in http
            ]
            ratio = median(ratios)
            verdict = "-" if ratio is None else ("met" if ratio >= GOAL else "missed")
            lines.append(
                f"| {clients} | {auth} | {fmt(direct, ',.0f')}"
                f" | {fmt(median([r.rate for r in pgbench if not r.error]), ',.0f')}"
                f" | {fmt(median([r.cpu_us for r in pgbench]), '.1f')}"
                f" | {fmt(median([r.rate for r in http]), ',.0f')}"
                f" | {fmt(median([r.cpu_us for r in http]), '.1f')}"
                f" | {fmt(median([r.p50_ms for r in http]), '.2f')}"
                f" / {fmt(median([r.p99_ms for r in http]), '.2f')}"
                f" | **{fmt(ratio, '.2f')}** ({', '.join(fmt(x, '.2f') for x in ratios)}) | {verdict} |"
            )
    return "\n".join(lines)


def render_report(
    results: Sequence[Measurement], args: argparse.Namespace, machine: str, started: str
) -> str:
    errors = [r for r in results if r.error]
    parts = [
        f"# HTTP `SELECT 1` through pypooler vs pgbench -S, {started}",
        "",
        f"Machine: {machine}. {args.rounds} rounds of {args.duration} s runs at each client count;"
        " medians, per-round ratios in brackets.",
        "",
        f"wrk (keep-alive, {THREADS} threads) POSTs neon()'s `SELECT 1` request to `/sql`; pgbench"
        f" `-n -S -M simple -j {THREADS}` over TCP. µs CPU is pypooler's process CPU"
        " (utime + stime from /proc/PID/stat) over the run ÷ requests or transactions. trust:"
        " bench.compare's auth; SCRAM: the SCRAM verifier in auth_file (every /sql request checks"
        " its password against it; pgbench logs in by SCRAM once per connection). Direct pgbench"
        " does not depend on pypooler's auth: the same figure on both rows.",
        "",
        render_table(results, args.clients),
    ]
    if errors:
        parts += ["", "Runs with errors (counted in the table when they have a rate):", ""]
        parts += [f"- round {r.round_no} c={r.clients} {r.auth} {r.target}: {r.error}" for r in errors]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http_speed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", type=lambda text: [int(n) for n in text.split(",")], default=list(DEFAULT_CLIENTS),
        help="client counts (wrk -c and pgbench -c), e.g. 10,100",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds")
    parser.add_argument("--duration", type=int, default=DEFAULT_DURATION_S, help="seconds per run")
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="after the rounds, py-spy each pypooler under one more HTTP and pgbench run; stacks go to DIR",
    )  # fmt: skip
    parser.add_argument(
        "--results-dir", type=Path, default=Path(__file__).resolve().parent / "results",
        help="where the report file goes",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which(WRK) is None:
        print("wrk is needed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    compare.exit_cleanly_on_sigterm()
    compare.raise_fd_limit()
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pypooler-httpspeed-"))
    try:
        results, machine = measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = render_report(results, args, machine, f"{started:%Y-%m-%d %H:%M} UTC")
    text += f"\nWhole run {(time.monotonic() - clock) / 60:.1f} min.\n"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"http-speed-{started:%Y%m%dT%H%M%SZ}.md"
    path.write_text(text)
    print(text, end="")
    progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
