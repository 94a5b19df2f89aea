"""pypooler against PgBouncer and direct PostgreSQL under pgbench: `python -m bench.compare`.

Starts its own throwaway PostgreSQL (max_connections 100), its own PgBouncer and its own
pypooler (both: transaction pooling, pool size 20), then runs `pgbench -S` (one SELECT per
transaction) at several client counts and `pgbench -S -C` (a new connection per transaction),
direct / PgBouncer / pypooler interleaved, and prints one markdown table: tps, mean latency,
proxy CPU per transaction and the pypooler/PgBouncer tps ratio (the bar is 0.8, the goal 1.0).

Rules this module keeps:
- It measures and prints; it never asserts. A run that fails (direct at 500 clients meets
  max_connections 100) is a cell reading "failed", with pgbench's own words under the table.
- Interleaved: each round runs every point against direct, PgBouncer and pypooler back to back,
  so drift on a shared machine hits all three alike; the ratio is taken within each round.
- Everything listens on 127.0.0.1, on random ports below the ephemeral range (32768-60999), so
  an outgoing connection cannot take a port between our free-port check and the bind.
- Every process we start is stopped by its own PID (try/finally), never by name. PgBouncer
  refuses to run as root, so under root it runs as `nobody` in a directory chowned to it.
- Proxy CPU is utime+stime from /proc/PID/stat around each pgbench run, divided by the
  transactions pgbench processed: it includes connection set-up, which is the point for -C.
- Children get a clean environment: no inherited PG* or PYPOOLER_* variables can redirect
  pgbench or override pypooler's config file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pypooler import __version__ as pypooler_version
from pypooler.embedded import DEFAULT_DBNAME, EmbeddedPostgres, random_free_port

LOOPBACK = "127.0.0.1"
PG_MAX_CONNECTIONS = 100
POOL_SIZE = 20
MAX_CLIENT_CONN = 2000
PGBOUNCER = "/usr/sbin/pgbouncer"
UNPRIVILEGED_USER = "nobody"

DEFAULT_POINTS = "10,100,500,20C"
DEFAULT_DURATION_S = 10
DEFAULT_ROUNDS = 2
DEFAULT_THREADS = 2  # pgbench -j: one per core on the 2-core machines we run on
# Scale 10 is 1,000,000 pgbench_accounts rows: big enough that -S is a real index lookup,
# small enough (~150 MB) that `pgbench -i` takes seconds and the table stays in memory.
DEFAULT_SCALE = 10
WARMUP_S = 2
WARMUP_CLIENTS = 10

RATIO_BAR = 0.8
RATIO_GOAL = 1.0

# Opening 500 connections through a proxy takes a while; a run this much past its -T hangs.
PGBENCH_GRACE_S = 90
PGBENCH_INIT_TIMEOUT_S = 600
PROXY_START_TIMEOUT_S = 30.0
PROXY_STOP_TIMEOUT_S = 10.0
PROXY_START_ATTEMPTS = 3
CLIENT_TIMEOUT_S = 30
# Both proxies close server connections idle this long, so between runs their pools hand
# PostgreSQL's slots back: otherwise 2 x 20 idle pooled servers leave direct -c 100 only 60
# of max_connections 100. A server busy in a run is never idle this long.
SERVER_IDLE_TIMEOUT_S = 2
# How long a direct run waits for the pools to drain before it starts anyway.
DRAIN_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
# /proc/PID/stat fields after "(comm) ": state is field 3, utime 14 and stime 15 (1-based).
_UTIME_INDEX = 14 - 3
_STIME_INDEX = 15 - 3

_XACTS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED_XACTS_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_LATENCY_RE = re.compile(r"^latency average = ([\d.]+) ms", re.MULTILINE)
# -C changes the tps line's note to "including reconnection times" (pgbench >= 14).
_TPS_RE = re.compile(
    r"^tps = ([\d.]+) \((?:without initial connection time|including reconnection times)\)",
    re.MULTILINE,
)
_SERVER_MESSAGE_RE = re.compile(r"(?:FATAL|ERROR):\s+(.+)")
_PORT_IN_USE_RE = re.compile(r"[Aa]ddress already in use")
_PROXY_LOG_TROUBLE_RE = re.compile(r"WARNING|ERROR|FATAL|CRITICAL|Traceback")


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- what we run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One pgbench configuration: `-S` at `clients`, plus `-C` when `reconnect`."""

    clients: int
    reconnect: bool
    # pgbench's built-in TPC-B-like script (5 statements in BEGIN..END) instead of -S.
    tpcb: bool = False
    # -M prepared instead of -M simple. PgBouncer 1.18 has no prepared statements in transaction
    # mode, so it is not run; pypooler's ratio is taken against its -M simple run at the same
    # point (`simple`), which must be among the points.
    prepared: bool = False

    @property
    def label(self) -> str:
        script = "TPC-B" if self.tpcb else "-S"
        if self.prepared:
            script += " -M prepared"
        return f"{script} -C c={self.clients}" if self.reconnect else f"{script} c={self.clients}"

    @property
    def simple(self) -> Point:
        return Point(self.clients, self.reconnect, self.tpcb)


def parse_points(text: str) -> list[Point]:
    """Parse "10,100,500,20C,100P": -S at 10, 100 and 500 clients, -S -C at 20 clients and
    -S -M prepared at 100 clients (whose ratio is taken against PgBouncer's -S at 100)."""
    points: list[Point] = []
    for token in text.split(","):
        token = token.strip()
        prepared = token.upper().endswith("P")
        digits = token[:-1] if prepared else token
        reconnect = digits.upper().endswith("C")
        digits = digits[:-1] if reconnect else digits
        if not digits.isdigit() or int(digits) < 1:
            raise argparse.ArgumentTypeError(
                f"bad point {token!r}: want a client count, optionally followed by C (for -C)"
                " and/or P (for -M prepared)"
            )
        points.append(Point(int(digits), reconnect, prepared=prepared))
    for point in points:
        if point.prepared and point.simple not in points:
            points.append(point.simple)  # the -M prepared ratio needs PgBouncer's -M simple run
    return points


@dataclass(slots=True)
class RunResult:
    """One pgbench run against one target; `error` is set when it did not complete."""

    round_no: int
    point: Point
    target: str
    xacts: int | None = None
    tps: float | None = None
    latency_ms: float | None = None
    proxy_cpu_s: float | None = None
    failed_xacts: int = 0
    error: str | None = None
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.tps is not None

    @property
    def cpu_us_per_xact(self) -> float | None:
        if not self.ok or self.proxy_cpu_s is None or not self.xacts:
            return None
        return self.proxy_cpu_s / self.xacts * 1e6


# -- processes -------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        # PYPOOLER_* would change the proxy's settings; PYPOOLER_PURE only picks the build.
        if not key.startswith(("PG", "PYPOOLER_")) or key == "PYPOOLER_PURE"
    }
    env.update(LC_ALL="C", LANG="C")
    return env


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
        stat = stat_file.read()
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[_UTIME_INDEX]) + int(fields[_STIME_INDEX])) / CLK_TCK


def read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


class Proxy:
    """A pooler process we started: stopped by its PID, its output kept in `log_path`."""

    __slots__ = (
        "clean_exit_codes",
        "exit_notes",
        "log_path",
        "name",
        "port",
        "process",
        "stop_signal",
    )

    def __init__(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        stop_signal: signal.Signals,
        clean_exit_codes: frozenset[int],
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.clean_exit_codes = clean_exit_codes  # after stop_signal
        self.exit_notes: list[str] = []  # anything unusual about how it ended

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """The proxy's own shutdown signal, then SIGKILL after a timeout. Idempotent."""
        if self.process.returncode is not None:
            return  # stopped already
        if not self.alive():
            self.exit_notes.append(f"exited on its own (code {self.process.returncode}) before we stopped it")
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(self.stop_signal)
        try:
            code = self.process.wait(timeout=PROXY_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.exit_notes.append(
                f"did not exit {PROXY_STOP_TIMEOUT_S:.0f} s after {self.stop_signal.name}; killed"
            )
            self.process.kill()
            self.process.wait()
            return
        if code not in self.clean_exit_codes:
            self.exit_notes.append(f"exit code {code} after {self.stop_signal.name}")


def client_env(postgres: EmbeddedPostgres, port: int, user: str | None = None) -> dict[str, str]:
    """pgbench/psql over TCP to 127.0.0.1:`port`, as postgres or `user` (with the password the
    cluster created it with)."""
    env = postgres.env() if user is None else postgres.env(user)
    env["PGPORT"] = str(port)
    # The cluster's env says PGPASSFILE=/dev/null, which libpq warns about on every connection
    # (500 lines at -c 500); a file that does not exist is silently ignored.
    env["PGPASSFILE"] = os.path.join(postgres.tmp_dir, "no-such-pgpass")
    return env


def run_psql(postgres: EmbeddedPostgres, port: int, sql: str) -> subprocess.CompletedProcess[str]:
    env = client_env(postgres, port)
    env["PGCONNECT_TIMEOUT"] = "2"
    return subprocess.run(
        [postgres.bin("psql"), "-X", "-A", "-t", "-w", "-c", sql],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )  # fmt: skip


def start_proxy(
    name: str,
    launch: Callable[[int], tuple[subprocess.Popen[bytes], Path]],
    postgres: EmbeddedPostgres,
    stop_signal: signal.Signals,
    clean_exit_codes: frozenset[int],
) -> Proxy:
    """Launch on a random free port until one answers a query end to end (a port race or a
    slow start is retried; anything else is raised with the proxy's log)."""
    last_error = ""
    for attempt in range(1, PROXY_START_ATTEMPTS + 1):
        port = random_free_port()
        process, log_path = launch(port)
        proxy = Proxy(name, process, port, log_path, stop_signal, clean_exit_codes)
        deadline = time.monotonic() + PROXY_START_TIMEOUT_S
        while time.monotonic() < deadline and proxy.alive():
            result = run_psql(postgres, port, "SELECT count(*) FROM pgbench_branches")
            if result.returncode == 0:
                progress(f"{name} is up on {LOOPBACK}:{port} (pid {proxy.pid})")
                return proxy
            last_error = result.stderr.strip()
            time.sleep(0.2)
        proxy.stop()
        log = read_tail(log_path)
        if attempt < PROXY_START_ATTEMPTS and _PORT_IN_USE_RE.search(log):
            progress(f"{name}: port {port} was taken, retrying")
            continue
        raise RuntimeError(
            f"{name} did not start on port {port} (exit code {process.returncode}); "
            f"last psql error: {last_error}\n{name} log {log_path}:\n{log}"
        )
    raise AssertionError("unreachable")


def start_pgbouncer(
    workdir: Path,
    postgres: EmbeddedPostgres,
    binary: str,
    *,
    name: str = "PgBouncer",
    settings: Mapping[str, str | int] | None = None,
) -> Proxy:
    """Start PgBouncer; `settings` adds to or replaces keys of its [pgbouncer] section."""
    run_as: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root.
        run_as = pwd.getpwnam(UNPRIVILEGED_USER)
    home = workdir / name.lower()
    home.mkdir(mode=0o700)
    if run_as is not None:
        os.chown(home, run_as.pw_uid, run_as.pw_gid)
    auth_file = home / "userlist.txt"
    # auth_type=trust still wants the user listed.
    auth_file.write_text(f'"{postgres.superuser}" ""\n')
    if run_as is not None:
        os.chown(auth_file, run_as.pw_uid, run_as.pw_gid)

    def launch(port: int) -> tuple[subprocess.Popen[bytes], Path]:
        ini = home / "pgbouncer.ini"
        section: dict[str, str | int] = {
            "listen_addr": LOOPBACK,
            "listen_port": port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(auth_file),
            "pool_mode": "transaction",
            "default_pool_size": POOL_SIZE,
            "max_client_conn": MAX_CLIENT_CONN,
            "logfile": str(home / "pgbouncer.log"),
            "pidfile": str(home / "pgbouncer.pid"),
            "ignore_startup_parameters": "extra_float_digits",
            # Same as pypooler's log_connections/log_disconnections = false below.
            "log_connections": 0,
            "log_disconnections": 0,
            "server_idle_timeout": SERVER_IDLE_TIMEOUT_S,
            **(settings or {}),
        }
        ini.write_text(
            "[databases]\n"
            f"{DEFAULT_DBNAME} = host={postgres.host} port={postgres.port} "
            f"dbname={DEFAULT_DBNAME}\n"
            "\n[pgbouncer]\n" + "".join(f"{key} = {value}\n" for key, value in section.items())
        )
        if run_as is not None:
            os.chown(ini, run_as.pw_uid, run_as.pw_gid)
        log_path = home / "pgbouncer.stderr"
        env = clean_env()
        env["HOME"] = str(home)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [binary, str(ini)],  # foreground: the PID we hold is PgBouncer's own
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=home,
                env=env,
                start_new_session=True,  # a Ctrl-C is ours to handle, in order
                user=run_as.pw_uid if run_as is not None else None,
                group=run_as.pw_gid if run_as is not None else None,
                extra_groups=[] if run_as is not None else None,
            )
        return process, log_path

    # SIGTERM is PgBouncer's immediate shutdown ("fast exit", status 1); SIGINT would wait
    # for clients.
    return start_proxy(name, launch, postgres, signal.SIGTERM, frozenset({1}))


def start_pypooler(
    workdir: Path,
    postgres: EmbeddedPostgres,
    *,
    name: str = "pypooler",
    source: Path | None = None,
    settings: Mapping[str, str | int | float | bool] | None = None,
) -> Proxy:
    """Start pypooler; `source`: a checkout of another revision to run instead of this tree;
    `settings`: top-level config keys added or replaced."""
    home = workdir / name.replace("@", "-")
    home.mkdir(mode=0o700)
    env = clean_env()
    if source is not None:
        env["PYTHONPATH"] = str(source)

    def launch(port: int) -> tuple[subprocess.Popen[bytes], Path]:
        config = home / "pypooler.toml"
        top: dict[str, str | int | float | bool] = {
            "listen_addr": LOOPBACK,
            "listen_port": port,
            "pool_mode": "transaction",
            "default_pool_size": POOL_SIZE,
            "max_client_conn": MAX_CLIENT_CONN,
            "log_connections": False,
            "log_disconnections": False,
            "log_level": "WARNING",
            "server_idle_timeout": SERVER_IDLE_TIMEOUT_S,
        }
        if source is None or _has_metrics(source):
            top["metrics_port"] = 0
        top.update(settings or {})
        config.write_text(
            "".join(f"{key} = {toml_value(value)}\n" for key, value in top.items())
            + f"\n[databases.{DEFAULT_DBNAME}]\n"
            f'host = "{postgres.host}"\n'
            f"port = {postgres.port}\n"
        )
        log_path = home / "pypooler.stderr"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pypooler", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=home,
                env=env,
                start_new_session=True,
            )
        return process, log_path

    return start_proxy(name, launch, postgres, signal.SIGINT, frozenset({0}))


def toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _has_metrics(source: Path) -> bool:
    return (source / "pypooler" / "metrics.py").exists()


def checkout_revision(
    workdir: Path, revision: str, patch: Path | None = None, compiled: bool = False
) -> Path:
    """A detached worktree of `revision` of this repository, removed with `workdir`, with
    `patch` applied to it (e.g. bench/baselines/no-stats.patch: the build without stats) and,
    when `compiled`, its hot path built with mypyc in place as `make compile` does."""
    target = workdir / f"src-{revision}"
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(target), revision],
        check=True,
    )
    if patch is not None:
        subprocess.run(["git", "-C", str(target), "apply", str(patch.resolve())], check=True)
    if compiled:
        # The Makefile's compile recipe, not `make compile`: the checkout has no venv, and given
        # ours, make would reinstall the checkout into it (the stamp predates its pyproject.toml).
        progress(f"compiling {revision} with mypyc (about a minute)")
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=target, env={**os.environ, "PYPOOLER_MYPYC": "1"}, check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        # build_ext may keep an old file time; the build counts as fresh only if newer than the sources.
        for library in target.glob("pypooler/**/*.so"):
            library.touch()
    return target


WHEEL_NAME = "pypooler-wheel"
VARIANT_NAME = "pypooler-variant"


def parse_variant(text: str) -> dict[str, str | int | float | bool]:
    """ "max_db_connections=30,reserve_pool_size=5": settings for a second pypooler of this tree."""
    settings: dict[str, str | int | float | bool] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"bad setting {item!r}: want KEY=VALUE")
        value: str | int | float | bool = raw.strip()
        if raw.strip() in ("true", "false"):
            value = raw.strip() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        settings[key.strip()] = value
    return settings


def install_wheel(workdir: Path) -> Path:
    """The package as users get it: a wheel built from this tree the way the Dockerfile builds
    it (`PYPOOLER_MYPYC=1 pip wheel`: the compiled build), unpacked into a directory the proxy
    then imports from (`start_pypooler(source=...)`). Built from a copy without the in-place
    build, so what runs is the wheel's own compilation."""
    repo = Path(__file__).resolve().parent.parent
    source = workdir / "wheel-src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(repo / name, source / name)
    shutil.copytree(
        repo / "pypooler", source / "pypooler", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    progress("building the wheel with mypyc, as the Dockerfile does (about two minutes)")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."],
        cwd=source, env={**os.environ, "PYPOOLER_MYPYC": "1"}, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    (wheel,) = (source / "dist").glob("pypooler-*.whl")
    installed = workdir / "wheel-installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    return installed


def baseline_name(revision: str, patch: Path | None, compiled: bool = False) -> str:
    return (
        f"pypooler@{revision}"
        + (f"+{patch.stem}" if patch is not None else "")
        + ("+mypyc" if compiled else "")
    )


def remove_checkout(path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(path)],
        check=False,
        capture_output=True,
    )


# -- pgbench ---------------------------------------------------------------------------------


def pgbench_init(postgres: EmbeddedPostgres, scale: int) -> None:
    result = subprocess.run(
        [postgres.bin("pgbench"), "-i", "-q", "-s", str(scale), DEFAULT_DBNAME],
        capture_output=True,
        text=True,
        env=client_env(postgres, postgres.port),  # straight to the server
        timeout=PGBENCH_INIT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench -i failed ({result.returncode}): {result.stderr.strip()}")


def other_backends(postgres: EmbeddedPostgres) -> int:
    """Client backends connected to PostgreSQL other than the one asking."""
    return int(
        postgres.psql(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            dbname="postgres",
        )
    )


def wait_for_drained_pools(postgres: EmbeddedPostgres) -> str | None:
    """Wait until the proxies' idle servers are closed, so a direct run gets all of
    max_connections; return a note if they were not within DRAIN_TIMEOUT_S."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while (busy := other_backends(postgres)) and time.monotonic() < deadline:
        time.sleep(0.25)
    if busy:
        return f"{busy} other connections still open after {DRAIN_TIMEOUT_S:.0f} s"
    return None


def failure_reason(stderr: str, returncode: int) -> str:
    """The server's own message if there is one, else pgbench's first error line."""
    match = _SERVER_MESSAGE_RE.search(stderr)
    if match:
        return match.group(1).strip()
    for line in stderr.splitlines():
        if "error" in line.lower() or "fatal" in line.lower():
            return line.strip()
    return f"pgbench exit code {returncode}"


def run_pgbench(
    postgres: EmbeddedPostgres,
    port: int,
    point: Point,
    *,
    duration_s: int,
    threads: int,
    proxy: Proxy | None,
    round_no: int,
    target: str,
    user: str | None = None,
) -> RunResult:
    run = RunResult(round_no, point, target)
    if proxy is not None and not proxy.alive():
        run.error = f"{proxy.name} is not running (exit code {proxy.process.returncode})"
        return run
    argv = [
        postgres.bin("pgbench"), "-n", *(() if point.tpcb else ("-S",)),
        "-M", "prepared" if point.prepared else "simple",
        "-T", str(duration_s),
        "-c", str(point.clients), "-j", str(min(threads, point.clients)),
    ]  # fmt: skip
    if point.reconnect:
        argv.append("-C")
    argv.append(DEFAULT_DBNAME)
    env = client_env(postgres, port, user)
    cpu_before = process_cpu_seconds(proxy.pid) if proxy is not None else None
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            timeout=duration_s + PGBENCH_GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        run.error = f"hung: no result {duration_s + PGBENCH_GRACE_S} s after start (killed)"
        stderr = exc.stderr
        run.stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
        return run
    if cpu_before is not None and proxy is not None and proxy.alive():
        run.proxy_cpu_s = process_cpu_seconds(proxy.pid) - cpu_before
    run.stderr = result.stderr
    xacts = _XACTS_RE.search(result.stdout)
    tps = _TPS_RE.search(result.stdout)
    latency = _LATENCY_RE.search(result.stdout)
    failed = _FAILED_XACTS_RE.search(result.stdout)
    run.xacts = int(xacts.group(1)) if xacts else None
    run.tps = float(tps.group(1)) if tps else None
    run.latency_ms = float(latency.group(1)) if latency else None
    run.failed_xacts = int(failed.group(1)) if failed else 0
    if result.returncode != 0:
        run.error = failure_reason(result.stderr, result.returncode)
    elif run.tps is None or run.xacts is None:
        run.error = "no tps in pgbench output"
    elif proxy is not None and not proxy.alive():
        run.error = f"{proxy.name} exited during the run (code {proxy.process.returncode})"
    return run


# -- report ----------------------------------------------------------------------------------


def command_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False
        ).stdout
    except OSError as exc:
        return f"? ({exc})"
    return out.splitlines()[0].strip() if out else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def pypooler_revision() -> str:
    """The git commit the pypooler under test is at, and whether its sources differ from it
    (numbers from a dirty tree belong to no commit)."""
    package_dir = Path(__file__).resolve().parent.parent / "pypooler"
    try:
        head = subprocess.run(
            ["git", "-C", str(package_dir), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(package_dir), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"git {head}" + (" + uncommitted changes" if dirty else "") + f", {pypooler_build()}"


def pypooler_build() -> str:
    """Whether the proxy we start runs the mypyc build or the Python sources (`make compile`;
    a stale or absent build, or PYPOOLER_PURE=1, means the sources). Asked of a fresh interpreter
    with the proxy's environment, so it sees what the proxy will see."""
    probe = subprocess.run(
        [sys.executable, "-c", "import pypooler.client as m; print(m.__file__)"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False, env=clean_env(),
    )  # fmt: skip
    origin = probe.stdout.strip()
    if not origin:
        return "build unknown"
    return "mypyc-compiled hot path" if not origin.endswith(".py") else "pure Python"


def describe_machine(postgres: EmbeddedPostgres, pgbouncer_binary: str) -> str:
    try:
        loop = f", uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = ""
    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}; "
        f"Python {platform.python_version()}{loop}, pypooler {pypooler_version} ({pypooler_revision()}); "
        f"{command_version([pgbouncer_binary, '--version'])}; "
        f"{command_version([postgres.bin('postgres'), '--version'])}"
    )


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def short(reason: str, limit: int = 40) -> str:
    reason = reason.replace("|", "/")
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def cell(
    runs: Sequence[RunResult],
    value: Callable[[RunResult], float | None],
    fmt: str,
    *,
    with_reason: bool = False,
) -> str:
    """Median over the rounds that completed; "failed" when none did."""
    ok = [run for run in runs if run.ok]
    if not ok:
        if not with_reason:
            return "failed"
        reasons = sorted({run.error or "?" for run in runs})
        return "failed: " + short("; ".join(reasons))
    median = median_or_none([value(run) for run in ok])
    text = "-" if median is None else format(median, fmt)
    if len(ok) < len(runs):
        text += f" ({len(runs) - len(ok)}/{len(runs)} failed)"
    return text


def round_ratios(
    runs: Sequence[RunResult], rounds: int, ours_name: str = "pypooler", theirs_name: str = "PgBouncer"
) -> list[float | None]:
    """ours tps / theirs tps within each round (None where either failed)."""
    ratios: list[float | None] = []
    for round_no in range(1, rounds + 1):
        by_target = {run.target: run for run in runs if run.round_no == round_no}
        ours, theirs = by_target.get(ours_name), by_target.get(theirs_name)
        if ours and theirs and ours.ok and theirs.ok and theirs.tps and ours.tps is not None:
            ratios.append(ours.tps / theirs.tps)
        else:
            ratios.append(None)
    return ratios


def ratio_runs(results: Sequence[RunResult], point: Point) -> list[RunResult]:
    """The runs a point's ratio is taken from: its own, but PgBouncer's -M simple run for a
    -M prepared point (see Point.prepared)."""
    if not point.prepared:
        return [run for run in results if run.point == point]
    return [run for run in results if run.point == point and run.target != "PgBouncer"] + [
        run for run in results if run.point == point.simple and run.target == "PgBouncer"
    ]


def verdict(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio >= RATIO_GOAL:
        return f"goal met (>= {RATIO_GOAL})"
    if ratio >= RATIO_BAR:
        return f"bar met (>= {RATIO_BAR})"
    return f"BELOW BAR (< {RATIO_BAR})"


def render_table(results: Sequence[RunResult], points: Sequence[Point], rounds: int) -> str:
    header = (
        "| pgbench | direct tps | direct ms | PgBouncer tps | PgBouncer ms | PgBouncer µs/xact "
        "| pypooler tps | pypooler ms | pypooler µs/xact | pypooler/PgBouncer (per round) "
        "| bar 0.8 / goal 1.0 |"
    )
    lines = [header, "|---|" + "---:|" * 9 + "---|"]
    for point in points:
        at_point = ratio_runs(results, point)
        row = [point.label]
        for target in ("direct", "PgBouncer", "pypooler"):
            runs = [run for run in results if run.point == point and run.target == target]
            if not runs:
                row += ["-", "-"] + ([] if target == "direct" else ["-"])
                continue
            row.append(cell(runs, lambda run: run.tps, ",.0f", with_reason=True))
            row.append(cell(runs, lambda run: run.latency_ms, ".3f"))
            if target != "direct":
                row.append(cell(runs, lambda run: run.cpu_us_per_xact, ".1f"))
        ratios = round_ratios(at_point, rounds)
        median = median_or_none(ratios)
        per_round = ", ".join("-" if ratio is None else f"{ratio:.2f}" for ratio in ratios)
        row.append("-" if median is None else f"**{median:.2f}** ({per_round})")
        row.append(verdict(median))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_baseline_table(
    results: Sequence[RunResult], points: Sequence[Point], rounds: int, baseline: str
) -> str:
    """This tree against another build (an older revision, or the wheel), both measured against
    PgBouncer in the same rounds."""
    lines = [
        f"| pgbench | {baseline} µs/xact | pypooler µs/xact | {baseline}/PgBouncer"
        " | pypooler/PgBouncer | pypooler / baseline ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        at_point = ratio_runs(results, point)
        base_runs = [run for run in at_point if run.target == baseline]
        our_runs = [run for run in at_point if run.target == "pypooler"]
        base = median_or_none(round_ratios(at_point, rounds, baseline))
        ours = median_or_none(round_ratios(at_point, rounds))
        change = "-" if not base or ours is None else f"{ours / base:.2f}"
        lines.append(
            f"| {point.label} | {cell(base_runs, lambda r: r.cpu_us_per_xact, '.1f')}"
            f" | {cell(our_runs, lambda r: r.cpu_us_per_xact, '.1f')}"
            f" | {'-' if base is None else f'{base:.2f}'} | {'-' if ours is None else f'{ours:.2f}'}"
            f" | {change} |"
        )
    return "\n".join(lines)


def render_notes(
    results: Sequence[RunResult], proxies: Sequence[Proxy], drain_notes: Sequence[str]
) -> list[str]:
    notes = [f"- {note}" for note in drain_notes]
    for run in results:
        if run.error is not None:
            stderr_lines = [line for line in run.stderr.splitlines() if line.strip()]
            shown = "; ".join(stderr_lines[:3]) or "(no stderr)"
            more = f" (+{len(stderr_lines) - 3} more lines)" if len(stderr_lines) > 3 else ""
            notes.append(
                f"- round {run.round_no}, {run.point.label}, {run.target}: {run.error}. "
                f"pgbench stderr: `{short(shown, 400)}`{more}"
            )
        elif run.failed_xacts:
            notes.append(
                f"- round {run.round_no}, {run.point.label}, {run.target}: "
                f"{run.failed_xacts} failed transactions"
            )
    for proxy in proxies:
        notes += [f"- {proxy.name}: {note}" for note in proxy.exit_notes]
        trouble = [
            line
            for line in read_tail(proxy.log_path, 10_000).splitlines()
            if _PROXY_LOG_TROUBLE_RE.search(line)
        ]
        if trouble:
            notes.append(f"- {proxy.name} log: {len(trouble)} warning/error lines, first ones:")
            notes += [f"  - `{short(line, 300)}`" for line in trouble[:5]]
    return notes


def render_report(
    *,
    started: datetime.datetime,
    machine: str,
    settings: str,
    table: str,
    notes: Sequence[str],
    elapsed_s: float,
) -> str:
    parts = [
        f"### pypooler vs PgBouncer, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine}.",
        "",
        f"Settings: {settings}; whole run {elapsed_s:.0f} s.",
        "",
        table,
        "",
        "tps excludes initial connection time (for -C it includes the reconnections); ms is"
        " pgbench's latency average; µs/xact is the proxy process's CPU time (user+system) per"
        " transaction, connection set-up included. Cells are medians over rounds; the ratio is"
        " pypooler tps / PgBouncer tps within each round.",
    ]
    if notes:
        parts += ["", "Notes:", "", *notes]
    return "\n".join(parts) + "\n"


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=int, default=DEFAULT_DURATION_S, help="seconds per pgbench run (-T)"
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds")
    parser.add_argument(
        "--points",
        type=parse_points,
        default=parse_points(DEFAULT_POINTS),
        help=f"comma-separated client counts, C suffix adds -C (default {DEFAULT_POINTS})",
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="pgbench -j")
    parser.add_argument("--scale", type=int, default=DEFAULT_SCALE, help="pgbench -i -s")
    parser.add_argument("--pgbouncer", default=PGBOUNCER, help="PgBouncer binary")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run pypooler at this git revision in every round (e.g. the build before a"
        " hot-path change) and print its ratio beside the current tree's",
    )
    parser.add_argument(
        "--baseline-patch",
        metavar="FILE",
        type=Path,
        help="apply this patch to the --baseline checkout (bench/baselines/no-stats.patch: the"
        " same tree without stats accounting)",
    )
    parser.add_argument(
        "--baseline-compiled",
        action="store_true",
        help="build the --baseline checkout with mypyc (as `make compile`) instead of running its"
        " Python sources",
    )
    parser.add_argument(
        "--wheel",
        action="store_true",
        help="also run the wheel this tree builds (the compiled build, as the Dockerfile installs"
        " it) in every round and print its ratio beside the in-place build's",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        metavar="KEY=VALUE,...",
        help="also run this tree with these settings (e.g. max_db_connections=30,reserve_pool_size=5)"
        " in every round and print its ratio beside the plain run's",
    )
    parser.add_argument(
        "--log-connections",
        action="store_true",
        help="PgBouncer and pypooler log every login and disconnection (both default to it) to a"
        " file, instead of neither logging them",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where compare-<timestamp>.md is written",
    )
    args = parser.parse_args(argv)
    if args.baseline_patch is not None and not args.baseline:
        parser.error("--baseline-patch needs --baseline")
    if args.baseline_compiled and not args.baseline:
        parser.error("--baseline-compiled needs --baseline")
    for name in ("duration", "rounds", "threads", "scale"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so the `finally` blocks stop every process we started (by
    default it would end us at once and leave PostgreSQL and the proxies running)."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def raise_fd_limit() -> None:
    # pgbench at 500 clients and the proxies' 2000 client slots need descriptors; children
    # inherit the soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def benchmark(args: argparse.Namespace) -> str:
    points: list[Point] = args.points
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    # Other work on the machine skews every number; the 1-minute load average before we start
    # anything shows some of it (later readings would mostly show our own pgbench and backends).
    load_start = os.getloadavg()[0]
    results: list[RunResult] = []
    proxies: list[Proxy] = []
    drain_notes: list[str] = []
    postgres = EmbeddedPostgres(max_connections=PG_MAX_CONNECTIONS)
    baseline_source: Path | None = None
    baseline_label = (
        baseline_name(args.baseline, args.baseline_patch, args.baseline_compiled) if args.baseline else ""
    )
    workdir = Path(tempfile.mkdtemp(prefix="pypooler-bench-"))
    os.chmod(workdir, 0o755)  # PgBouncer, as nobody, must reach its subdirectory
    try:
        progress(f"starting PostgreSQL (max_connections {PG_MAX_CONNECTIONS})")
        postgres.start()
        progress(f"PostgreSQL is up on {postgres.host}:{postgres.port}; pgbench -i -s {args.scale}")
        pgbench_init(postgres, args.scale)
        # --log-connections: both log a line per login and per disconnection (their default),
        # to a file, as deployed; otherwise neither logs them.
        pgbouncer_logs = {"log_connections": 1, "log_disconnections": 1} if args.log_connections else None
        pypooler_logs: dict[str, str | int | float | bool] | None = (
            {"log_connections": True, "log_disconnections": True, "log_level": "INFO"}
            if args.log_connections
            else None
        )
        proxies.append(start_pgbouncer(workdir, postgres, args.pgbouncer, settings=pgbouncer_logs))
        proxies.append(start_pypooler(workdir, postgres, settings=pypooler_logs))
        pgbouncer, pypooler = proxies[0], proxies[1]
        targets: list[tuple[str, int, Proxy | None]] = [
            ("direct", postgres.port, None),
            ("PgBouncer", pgbouncer.port, pgbouncer),
            ("pypooler", pypooler.port, pypooler),
        ]
        if args.baseline:
            baseline_source = checkout_revision(
                workdir, args.baseline, args.baseline_patch, compiled=args.baseline_compiled
            )
            baseline = start_pypooler(
                workdir, postgres, name=baseline_label, source=baseline_source, settings=pypooler_logs
            )
            proxies.append(baseline)
            targets.append((baseline.name, baseline.port, baseline))
        if args.variant:
            variant = start_pypooler(
                workdir, postgres, name=VARIANT_NAME, settings={**(pypooler_logs or {}), **args.variant}
            )
            proxies.append(variant)
            targets.append((variant.name, variant.port, variant))
        if args.wheel:
            shipped = start_pypooler(
                workdir, postgres, name=WHEEL_NAME, source=install_wheel(workdir), settings=pypooler_logs
            )
            proxies.append(shipped)
            targets.append((shipped.name, shipped.port, shipped))
        machine = describe_machine(postgres, args.pgbouncer)
        progress(machine)
        warmup = Point(WARMUP_CLIENTS, reconnect=False)
        for name, port, proxy in targets:
            run = run_pgbench(
                postgres, port, warmup, duration_s=WARMUP_S, threads=args.threads,
                proxy=proxy, round_no=0, target=name,
            )  # fmt: skip
            progress(f"warm-up {name}: " + (f"{run.tps:,.0f} tps" if run.ok else f"{run.error}"))
        total = args.rounds * sum(len(targets) - point.prepared for point in points)
        for round_no in range(1, args.rounds + 1):
            for point in points:
                for name, port, proxy in targets:
                    if point.prepared and name == "PgBouncer":
                        continue  # see Point.prepared
                    if proxy is None:
                        drain_note = wait_for_drained_pools(postgres)
                        if drain_note is not None:
                            drain_notes.append(f"round {round_no}, {point.label}: {drain_note}")
                            progress(f"direct run starts with {drain_note}")
                    run = run_pgbench(
                        postgres, port, point, duration_s=args.duration,
                        threads=args.threads, proxy=proxy, round_no=round_no, target=name,
                    )  # fmt: skip
                    results.append(run)
                    if run.ok:
                        cpu = run.cpu_us_per_xact
                        summary = f"{run.tps:,.0f} tps, {run.latency_ms} ms" + (
                            "" if cpu is None else f", {cpu:.1f} µs/xact"
                        )
                    else:
                        summary = f"FAILED: {run.error}"
                    progress(f"[{len(results)}/{total}] round {round_no} {point.label} {name}: {summary}")
        for proxy in proxies:
            proxy.stop()
        notes = render_notes(results, proxies, drain_notes)
    finally:
        for proxy in reversed(proxies):
            try:
                proxy.stop()
            except Exception as exc:
                progress(f"stopping {proxy.name} (pid {proxy.pid}) failed: {exc}")
        if baseline_source is not None:
            remove_checkout(baseline_source)
        try:
            postgres.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    settings = (
        f"pool_size {POOL_SIZE}, transaction mode, PostgreSQL max_connections "
        f"{PG_MAX_CONNECTIONS}, server_idle_timeout {SERVER_IDLE_TIMEOUT_S} s (direct runs wait"
        " for the pools to drain); "
        f"`pgbench -n -S -M simple -T {args.duration} -j "
        f"min({args.threads}, c)`, scale {args.scale}; {args.rounds} rounds, each running"
        " every row direct, PgBouncer, pypooler back to back"
    )
    table = render_table(results, points, args.rounds)
    if args.baseline:
        table += "\n\n" + render_baseline_table(results, points, args.rounds, baseline_label)
    if args.wheel:
        table += "\n\n" + render_baseline_table(results, points, args.rounds, WHEEL_NAME)
    if args.variant:
        shown = ", ".join(f"{key} = {value}" for key, value in args.variant.items())
        table += f"\n\n{VARIANT_NAME}: {shown}\n\n" + render_baseline_table(
            results, points, args.rounds, VARIANT_NAME
        )
    return render_report(
        started=started,
        machine=f"{machine}; load average {load_start:.2f} at start",
        settings=settings,
        table=table,
        notes=notes,
        elapsed_s=time.monotonic() - clock,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_sigterm()
    raise_fd_limit()
    report = benchmark(args)
    print(report, end="")
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"compare-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}.md"
    path.write_text(report)
    progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
