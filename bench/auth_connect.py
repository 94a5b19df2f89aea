"""SCRAM login cost through pypooler and PgBouncer: `python -m bench.auth_connect`.

A serverless workload logs in for nearly every transaction, so the proxy's per-login work is its
throughput. This runs `pgbench -n -S -C -T 8 -c 10` (a new connection, hence a SCRAM-SHA-256
login, per transaction) as a SCRAM user against PgBouncer and pypooler, interleaved over rounds,
both configured alike: auth_type scram-sha-256, an auth_file holding the user's SCRAM verifier
(the one PostgreSQL stores, so both log in to the server by SCRAM pass-through), transaction
pooling, pool size 10. It prints tps and the proxy's CPU time per connection.

libpq derives the SCRAM keys from the password on every connection (PBKDF2, 4096 rounds), which
costs pgbench more CPU than either proxy spends, so on a small machine pgbench -C measures mostly
pgbench. A second table therefore drives the same logins from a client that derives its keys once
(`login-loop` below: startup, SCRAM, one SELECT, Terminate, in a loop on 10 connections): there
the proxy is the bottleneck and its CPU per login is the number to compare.

Two more measurements, because they are claims the README makes:
- no user enumeration by timing: the median time from SASLResponse to the FATAL error for an
  unknown user and for a known user with a wrong proof;
- TLS costs the plaintext path nothing: `pgbench -S` (no -C) over plaintext against pypooler with
  client TLS disabled and with client TLS configured (`prefer`), interleaved; the proxy's CPU per
  transaction is the number to read (tps moves with the machine's load).

Rules: it measures and prints, never asserts. Rounds alternate the order of the compared
targets (ABBA), because the load of a shared machine drifts during a run. Everything listens on
127.0.0.1 on random ports below 32768; every process started here is stopped by its own PID.
PgBouncer refuses to run as root, so under root it runs as `nobody` from a directory chowned
to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.compare import clean_env, process_cpu_seconds, read_tail
from pypooler.embedded import DEFAULT_DBNAME, EmbeddedPostgres, random_free_port
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.scram import MECHANISM, ScramClientExchange

LOOPBACK = "127.0.0.1"
PGBOUNCER = "/usr/sbin/pgbouncer"
UNPRIVILEGED_USER = "nobody"
USER, PASSWORD = "pp_scram", "scrampass"
POOL_SIZE = 10
# Five proxies with POOL_SIZE servers each, plus psql and pgbench -i, with room to spare.
PG_MAX_CONNECTIONS = 100
CLIENTS = 10
THREADS = 2
DEFAULT_DURATION_S = 8
DEFAULT_ROUNDS = 2
WARMUP_S = 2
TIMING_ATTEMPTS = 300
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
PGBENCH_GRACE_S = 60

_TPS_RE = re.compile(r"^tps = ([\d.]+)", re.MULTILINE)
_XACTS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


def progress(message: str) -> None:
    print(f"[auth_connect] {message}", file=sys.stderr, flush=True)


@dataclass
class Proxy:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    stop_signal: signal.Signals

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Run:
    target: str
    tps: float | None = None
    xacts: int | None = None
    cpu_s: float | None = None
    error: str = ""

    @property
    def cpu_us_per_connection(self) -> float | None:
        if self.cpu_s is None or not self.xacts:
            return None
        return self.cpu_s / self.xacts * 1e6


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)

    def of(self, target: str) -> list[Run]:
        return [run for run in self.runs if run.target == target and run.tps is not None]


# -- processes -------------------------------------------------------------------------------


def client_env(postgres: EmbeddedPostgres, port: int) -> dict[str, str]:
    env = postgres.env(USER, PASSWORD)
    env["PGPORT"] = str(port)
    env["PGSSLMODE"] = "disable"
    env["PGPASSFILE"] = "/nonexistent/pgpass"
    return env


def wait_until_serving(proxy: Proxy, postgres: EmbeddedPostgres) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline and proxy.process.poll() is None:
        result = subprocess.run(
            [postgres.bin("psql"), "-X", "-A", "-t", "-w", "-c", "SELECT 1"],
            env=client_env(postgres, proxy.port), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode == 0:
            progress(f"{proxy.name} is up on port {proxy.port} (pid {proxy.process.pid})")
            return
        last = result.stderr.strip()
        time.sleep(0.2)
    raise RuntimeError(f"{proxy.name} did not start: {last}\n{read_tail(proxy.log_path)}")


def start_pgbouncer(home: Path, postgres: EmbeddedPostgres, secret: str, *, name: str = "PgBouncer") -> Proxy:
    run_as = pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None
    home.mkdir(mode=0o700)
    port = random_free_port()
    auth_file = home / "userlist.txt"
    auth_file.write_text(f'"{USER}" "{secret}"\n')
    ini = home / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n{DEFAULT_DBNAME} = host={postgres.host} port={postgres.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = {LOOPBACK}\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {auth_file}\n"
        f"pool_mode = transaction\ndefault_pool_size = {POOL_SIZE}\nmax_client_conn = 1000\n"
        f"logfile = {home / 'pgbouncer.log'}\npidfile = {home / 'pgbouncer.pid'}\n"
        "log_connections = 0\nlog_disconnections = 0\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    for path in (home, auth_file, ini):
        if run_as is not None:
            os.chown(path, run_as.pw_uid, run_as.pw_gid)
    log_path = home / "pgbouncer.stderr"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [PGBOUNCER, str(ini)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=home,
            env={**clean_env(), "HOME": str(home)}, start_new_session=True,
            user=run_as.pw_uid if run_as else None, group=run_as.pw_gid if run_as else None,
            extra_groups=[] if run_as else None,
        )  # fmt: skip
    proxy = Proxy(name, process, port, log_path, signal.SIGTERM)
    wait_until_serving(proxy, postgres)
    return proxy


def start_pypooler(
    home: Path, postgres: EmbeddedPostgres, secret: str, *, name: str = "pypooler", tls: bool = False
) -> Proxy:
    home.mkdir(mode=0o700)
    port = random_free_port()
    auth_file = home / "userlist.txt"
    auth_file.write_text(f'"{USER}" "{secret}"\n')
    tls_lines = ""
    if tls:
        make_certificate(home)
        tls_lines = (
            'client_tls_sslmode = "prefer"\n'
            f'client_tls_cert_file = "{home / "server.crt"}"\n'
            f'client_tls_key_file = "{home / "server.key"}"\n'
        )
    config = home / "pypooler.toml"
    config.write_text(
        f'listen_addr = "{LOOPBACK}"\nlisten_port = {port}\npool_mode = "transaction"\n'
        f"default_pool_size = {POOL_SIZE}\nlog_connections = false\nlog_disconnections = false\n"
        f'log_level = "WARNING"\nauth_type = "scram-sha-256"\nauth_file = "{auth_file}"\n'
        'server_tls_sslmode = "disable"\nmetrics_port = 0\n'
        f"{tls_lines}"
        f'\n[databases.{DEFAULT_DBNAME}]\nhost = "{postgres.host}"\nport = {postgres.port}\n'
    )
    log_path = home / "pypooler.stderr"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pypooler", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=home,
            env=clean_env(), start_new_session=True,
        )  # fmt: skip
    proxy = Proxy(name, process, port, log_path, signal.SIGINT)
    wait_until_serving(proxy, postgres)
    return proxy


def make_certificate(directory: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "server.key", "-out", "server.crt", "-subj", "/CN=localhost",
         "-days", "1"],
        cwd=directory, check=True, capture_output=True, timeout=30,
    )  # fmt: skip


@contextlib.contextmanager
def running(proxies: list[Proxy]) -> Iterator[list[Proxy]]:
    try:
        yield proxies
    finally:
        for proxy in proxies:
            proxy.stop()


# -- measurements ------------------------------------------------------------------------------


def pgbench(postgres: EmbeddedPostgres, proxy: Proxy, duration: int, *, reconnect: bool) -> Run:
    run = Run(proxy.name)
    argv = [
        postgres.bin("pgbench"), "-n", "-S", "-M", "simple", "-T", str(duration),
        "-c", str(CLIENTS), "-j", str(THREADS), *(["-C"] if reconnect else []), DEFAULT_DBNAME,
    ]  # fmt: skip
    cpu_before = process_cpu_seconds(proxy.process.pid)
    result = subprocess.run(
        argv, env=client_env(postgres, proxy.port), capture_output=True, text=True,
        timeout=duration + PGBENCH_GRACE_S,
    )  # fmt: skip
    run.cpu_s = process_cpu_seconds(proxy.process.pid) - cpu_before
    tps, xacts = _TPS_RE.search(result.stdout), _XACTS_RE.search(result.stdout)
    if result.returncode != 0 or tps is None or xacts is None:
        run.error = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return run
    run.tps, run.xacts = float(tps.group(1)), int(xacts.group(1))
    return run


def failed_login_seconds(port: int, user: str) -> float:
    """Seconds from our (wrong) SCRAM proof to pypooler's FATAL error."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        reader = codec.MessageReader()

        def next_message() -> tuple[int, bytes]:
            while True:
                messages = reader.feed(sock.recv(65536))
                if messages:
                    return messages[0]

        sock.sendall(codec.build_startup_message({"user": user, "database": DEFAULT_DBNAME}))
        next_message()
        sock.sendall(codec.build_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=benchnonce"))
        _, body = next_message()
        nonce = codec.parse_authentication(body)[1].split(b",")[0][2:]
        started = time.perf_counter()
        sock.sendall(codec.build_sasl_response(b"c=biws,r=" + nonce + b",p=" + b"A" * 43 + b"="))
        msg_type, _ = next_message()
        elapsed = time.perf_counter() - started
        assert msg_type == c.B_ERROR_RESPONSE
        return elapsed


async def _login_once(port: int) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    messages = codec.MessageReader()
    queue: list[tuple[int, bytes]] = []

    async def until(msg_type: int) -> bytes:
        while True:
            while queue:
                got, body = queue.pop(0)
                if got == c.B_ERROR_RESPONSE:
                    raise RuntimeError(codec.parse_error_fields(body).get("M"))
                if got == msg_type:
                    return body
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            queue.extend(messages.feed(data))

    writer.write(codec.build_startup_message({"user": USER, "database": DEFAULT_DBNAME}))
    await until(c.B_AUTHENTICATION)
    # derived_keys() is cached per (password, salt, iterations): PBKDF2 runs once per salt here.
    scram = ScramClientExchange(password=PASSWORD)
    writer.write(codec.build_sasl_initial_response(MECHANISM, scram.client_first()))
    server_first = codec.parse_authentication(await until(c.B_AUTHENTICATION))[1]
    writer.write(codec.build_sasl_response(scram.server_first(server_first)))
    await until(c.B_READY_FOR_QUERY)
    writer.write(codec.build_query("SELECT 1"))
    await until(c.B_READY_FOR_QUERY)
    writer.write(codec.TERMINATE)
    writer.close()


async def _login_loop(port: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    done = 0

    async def connection() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await _login_once(port)
            done += 1

    await asyncio.gather(*(connection() for _ in range(CLIENTS)))
    return done


def login_loop(proxy: Proxy, duration: int) -> Run:
    """The login-loop client in its own process (its CPU must not be the proxy's)."""
    run = Run(proxy.name)
    cpu_before = process_cpu_seconds(proxy.process.pid)
    result = subprocess.run(
        [sys.executable, "-m", "bench.auth_connect", "login-loop", str(proxy.port), str(duration)],
        capture_output=True, text=True, timeout=duration + PGBENCH_GRACE_S, env=clean_env(),
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    run.cpu_s = process_cpu_seconds(proxy.process.pid) - cpu_before
    if result.returncode != 0 or not result.stdout.strip().isdigit():
        run.error = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return run
    run.xacts = int(result.stdout.strip())
    run.tps = run.xacts / duration
    return run


def enumeration_timing(port: int) -> tuple[float, float]:
    known, unknown = [], []
    for _ in range(TIMING_ATTEMPTS):  # interleaved, so drift hits both alike
        known.append(failed_login_seconds(port, USER))
        unknown.append(failed_login_seconds(port, "no_such_user"))
    return statistics.median(known) * 1e6, statistics.median(unknown) * 1e6


# -- report ----------------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def login_table(title: str, results: Results, unit: str) -> list[str]:
    lines = [title, "", f"| proxy | {unit} | proxy CPU µs / login | runs |", "|---|---:|---:|---|"]
    for target in ("PgBouncer", "pypooler"):
        runs = results.of(target)
        lines.append(
            f"| {target} | {fmt(median([r.tps for r in runs]), ',.0f')} |"
            f" {fmt(median([r.cpu_us_per_connection for r in runs]), ',.0f')} |"
            f" {', '.join(fmt(r.tps, ',.0f') for r in runs) or 'failed'} |"
        )
    ours = median([r.tps for r in results.of("pypooler")])
    theirs = median([r.tps for r in results.of("PgBouncer")])
    cpu_ours = median([r.cpu_us_per_connection for r in results.of("pypooler")])
    cpu_theirs = median([r.cpu_us_per_connection for r in results.of("PgBouncer")])
    if ours and theirs and cpu_ours and cpu_theirs:
        lines += [
            "",
            f"pypooler / PgBouncer: {unit} **{ours / theirs:.2f}**, CPU per login"
            f" **{cpu_ours / cpu_theirs:.2f}**",
        ]
    return lines


def report(
    scram: Results,
    loop: Results,
    loop_plain: Results,
    plain: Results,
    timing: tuple[float, float],
    duration: int,
    rounds: int,
) -> str:
    lines = login_table(
        f"### SCRAM-SHA-256 logins: `pgbench -n -S -C -T {duration} -c {CLIENTS} -j {THREADS}`,"
        f" {rounds} rounds (medians)",
        scram,
        "tps",
    )
    lines.append("")
    lines += login_table(
        f"### SCRAM-SHA-256 logins from a client that keeps its keys (`login-loop`, {CLIENTS}"
        f" connections, {duration} s), {rounds} rounds (medians)",
        loop,
        "logins/s",
    )
    lines.append("")
    lines += login_table(
        "### The same with the plain password in both auth_files (SCRAM keys derived by the proxy)",
        loop_plain,
        "logins/s",
    )
    errors = [
        f"- {run.target}: {run.error}"
        for run in scram.runs + loop.runs + loop_plain.runs + plain.runs
        if run.error
    ]
    lines += [
        "",
        f"### No enumeration by timing: FATAL after a wrong SCRAM proof, median of {TIMING_ATTEMPTS}",
        "",
        f"known user {timing[0]:.0f} µs, unknown user {timing[1]:.0f} µs",
        "",
        f"### TLS configured vs not, plaintext `pgbench -n -S -T {duration} -c {CLIENTS}` (medians)",
        "",
        "| pypooler | tps | proxy CPU µs / transaction | runs (tps) |",
        "|---|---:|---:|---|",
    ]
    for target in ("no client TLS", "client TLS prefer"):
        runs = plain.of(target)
        lines.append(
            f"| {target} | {fmt(median([r.tps for r in runs]), ',.0f')} |"
            f" {fmt(median([r.cpu_us_per_connection for r in runs]), '.1f')} |"
            f" {', '.join(fmt(r.tps, ',.0f') for r in runs)} |"
        )
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["login-loop"]:  # the client process of login_loop()
        port, seconds = argv[1:3]
        print(uvloop.run(_login_loop(int(port), float(seconds))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.auth_connect", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=DEFAULT_DURATION_S, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pypooler-authbench-"))
    os.chmod(workdir, 0o755)  # PgBouncer, as nobody, must reach its directory
    scram, loop, loop_plain, plain = Results(), Results(), Results(), Results()
    try:
        timing = measure(args, workdir, scram, loop, loop_plain, plain)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(scram, loop, loop_plain, plain, timing, args.duration, args.rounds))
    return 0


def measure(
    args: argparse.Namespace,
    workdir: Path,
    scram: Results,
    loop: Results,
    loop_plain: Results,
    plain: Results,
) -> tuple[float, float]:
    with EmbeddedPostgres(max_connections=PG_MAX_CONNECTIONS) as postgres:
        progress("pgbench -i -s 1")
        subprocess.run(
            [postgres.bin("pgbench"), "-i", "-q", "-s", "1", DEFAULT_DBNAME],
            env=postgres.env(), capture_output=True, check=True, timeout=300,
        )  # fmt: skip
        postgres.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {USER}")
        verifier = postgres.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")
        with running([]) as proxies:
            proxies.append(start_pgbouncer(workdir / "pgbouncer", postgres, verifier))
            proxies.append(start_pypooler(workdir / "pypooler", postgres, verifier))
            proxies.append(start_pypooler(workdir / "pypooler-tls", postgres, verifier, name="tls", tls=True))
            # The same two with the plain password in auth_file: each must build SCRAM keys.
            proxies.append(start_pgbouncer(workdir / "pgbouncer-plain", postgres, PASSWORD))
            proxies.append(start_pypooler(workdir / "pypooler-plain", postgres, PASSWORD))
            bouncer, pooler, with_tls, bouncer_plain, pooler_plain = proxies
            for round_no in range(1, args.rounds + 1):
                # ABBA: the order flips every round, so a load that drifts during the run
                # (a shared machine) does not always favour the one measured first.
                flip = round_no % 2 == 0
                for proxy in (pooler, bouncer) if flip else (bouncer, pooler):
                    progress(f"round {round_no}: -C against {proxy.name}")
                    scram.runs.append(pgbench(postgres, proxy, args.duration, reconnect=True))
                    progress(f"round {round_no}: login-loop against {proxy.name}")
                    loop.runs.append(login_loop(proxy, args.duration))
                for proxy in (pooler_plain, bouncer_plain) if flip else (bouncer_plain, pooler_plain):
                    progress(f"round {round_no}: login-loop against {proxy.name}, plain auth_file")
                    loop_plain.runs.append(login_loop(proxy, args.duration))
            progress("timing of failed logins")
            timing = enumeration_timing(pooler.port)
            for proxy in (pooler, with_tls):  # both pools opened to full size before measuring
                pgbench(postgres, proxy, WARMUP_S, reconnect=False)
            for round_no in range(1, args.rounds + 1):
                pair = [(pooler, "no client TLS"), (with_tls, "client TLS prefer")]
                for proxy, label in pair[::-1] if round_no % 2 == 0 else pair:
                    progress(f"round {round_no}: plaintext -S against pypooler, {label}")
                    run = pgbench(postgres, proxy, args.duration, reconnect=False)
                    run.target = label
                    plain.runs.append(run)
    return timing


if __name__ == "__main__":
    sys.exit(main())
