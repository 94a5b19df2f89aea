"""pgbench's three query modes through pypooler, before vs after a change: `python -m bench.protocols`.

Starts a throwaway PostgreSQL (max_connections 100), pypooler from this checkout and, with
`--baseline REF`, a second pypooler built from git revision REF (extracted with `git archive`
into a temporary directory), both in transaction mode with pool size 20. It then runs
`pgbench -n -S -M {simple,extended,prepared} -c 100` against each, interleaved per round, and
prints a markdown table of tps and proxy CPU µs per transaction.

Rules this module keeps (the same as bench/compare.py, whose helpers it uses):
- It measures and prints; it never asserts. A run that fails is a cell reading "failed"
  (`-M prepared` fails on a pooler without prepared-statement support).
- Interleaved: each round runs every mode against every pooler back to back.
- Every process we start is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.compare import (
    _FAILED_XACTS_RE,
    _TPS_RE,
    _XACTS_RE,
    LOOPBACK,
    MAX_CLIENT_CONN,
    PG_MAX_CONNECTIONS,
    PGBENCH_GRACE_S,
    POOL_SIZE,
    Proxy,
    clean_env,
    failure_reason,
    median_or_none,
    pgbench_init,
    process_cpu_seconds,
    progress,
    raise_fd_limit,
    start_proxy,
)
from pypooler.embedded import DEFAULT_DBNAME, EmbeddedPostgres

MODES = ("simple", "extended", "prepared")
DEFAULT_CLIENTS = 100
DEFAULT_DURATION_S = 8
DEFAULT_ROUNDS = 2
DEFAULT_SCALE = 1  # -S on 100,000 rows: the proxy, not the index lookup, is what we measure
REPO = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class ModeRun:
    target: str
    mode: str
    tps: float | None = None
    cpu_us: float | None = None
    error: str | None = None


def extract_revision(ref: str, into: Path) -> Path:
    """`git archive REF` of this repository, unpacked into `into` (the working tree is untouched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref],
        capture_output=True, check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def start_pypooler_from(name: str, source: Path, home: Path, postgres: EmbeddedPostgres) -> Proxy:
    home.mkdir(mode=0o700)

    def launch(port: int) -> tuple[subprocess.Popen[bytes], Path]:
        config = home / "pypooler.toml"
        config.write_text(
            f'listen_addr = "{LOOPBACK}"\n'
            f"listen_port = {port}\n"
            'pool_mode = "transaction"\n'
            f"default_pool_size = {POOL_SIZE}\n"
            f"max_client_conn = {MAX_CLIENT_CONN}\n"
            "log_connections = false\n"
            "log_disconnections = false\n"
            'log_level = "WARNING"\n'
            f"\n[databases.{DEFAULT_DBNAME}]\n"
            f'host = "{postgres.host}"\n'
            f"port = {postgres.port}\n"
        )
        env = clean_env()
        env["PYTHONPATH"] = str(source)  # this source tree wins over the installed package
        log_path = home / "pypooler.stderr"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pypooler", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=source, env=env, start_new_session=True,
            )  # fmt: skip
        return process, log_path

    return start_proxy(name, launch, postgres, signal.SIGINT, frozenset({0}))


def run_mode(
    postgres: EmbeddedPostgres, proxy: Proxy, mode: str, *, clients: int, duration_s: int, threads: int
) -> ModeRun:
    run = ModeRun(proxy.name, mode)
    argv = [
        postgres.bin("pgbench"), "-n", "-S", "-M", mode, "-T", str(duration_s),
        "-c", str(clients), "-j", str(min(threads, clients)), DEFAULT_DBNAME,
    ]  # fmt: skip
    env = postgres.env()
    env["PGPORT"] = str(proxy.port)
    before = process_cpu_seconds(proxy.pid)
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, env=env,
            timeout=duration_s + PGBENCH_GRACE_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        run.error = "hung"
        return run
    cpu = process_cpu_seconds(proxy.pid) - before if proxy.alive() else None
    xacts = _XACTS_RE.search(result.stdout)
    tps = _TPS_RE.search(result.stdout)
    failed = _FAILED_XACTS_RE.search(result.stdout)
    if result.returncode != 0 or tps is None or xacts is None:
        run.error = failure_reason(result.stderr, result.returncode)
    elif failed and int(failed.group(1)):
        run.error = f"{failed.group(1)} failed transactions"
    else:
        run.tps = float(tps.group(1))
        if cpu is not None and int(xacts.group(1)):
            run.cpu_us = cpu / int(xacts.group(1)) * 1e6
    return run


def render(results: Sequence[ModeRun], targets: Sequence[str]) -> str:
    header = "| mode | " + " | ".join(f"{t} tps | {t} µs/xact" for t in targets) + " |"
    lines = [header, "|---" * (1 + 2 * len(targets)) + "|"]
    for mode in MODES:
        row = [f"-M {mode}"]
        for target in targets:
            runs = [r for r in results if r.target == target and r.mode == mode]
            if any(r.error for r in runs):
                reason = next(r.error for r in runs if r.error)
                row += [f"failed ({(reason or '')[:50]})", "-"]
                continue
            tps = median_or_none([r.tps for r in runs])
            cpu = median_or_none([r.cpu_us for r in runs])
            row.append("-" if tps is None else f"{tps:,.0f}")
            row.append("-" if cpu is None else f"{cpu:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.protocols", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare against (e.g. main)")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--duration", type=int, default=DEFAULT_DURATION_S)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=int, default=DEFAULT_SCALE)
    args = parser.parse_args(argv)
    raise_fd_limit()
    clock = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pypooler-bench-protocols-"))
    os.chmod(workdir, 0o755)
    postgres = EmbeddedPostgres(max_connections=PG_MAX_CONNECTIONS)
    proxies: list[Proxy] = []
    results: list[ModeRun] = []
    try:
        postgres.start()
        pgbench_init(postgres, args.scale)
        if args.baseline:
            source = extract_revision(args.baseline, workdir / "baseline-src")
            proxies.append(start_pypooler_from(f"before ({args.baseline})", source, workdir / "b", postgres))
        proxies.append(start_pypooler_from("after", REPO, workdir / "a", postgres))
        for round_no in range(1, args.rounds + 1):
            for mode in MODES:
                for proxy in proxies:
                    run = run_mode(
                        postgres, proxy, mode, clients=args.clients,
                        duration_s=args.duration, threads=args.threads,
                    )  # fmt: skip
                    results.append(run)
                    shown = run.error or f"{run.tps:,.0f} tps, {run.cpu_us or 0:.1f} µs/xact"
                    progress(f"round {round_no} -M {mode} {proxy.name}: {shown}")
    finally:
        for proxy in reversed(proxies):
            proxy.stop()
        postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"pgbench -n -S -c {args.clients} -j {args.threads} -T {args.duration}, scale {args.scale}, "
        f"pool_size {POOL_SIZE}, {args.rounds} rounds (medians), {time.monotonic() - clock:.0f} s\n"
    )
    print(render(results, [p.name for p in proxies]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
