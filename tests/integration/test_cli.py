"""The `pypooler` command as a user runs it: a real process, real signals, real psql."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pypooler.embedded import EmbeddedPostgres

PSQL = "psql"


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pypooler", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYPOOLER_METRICS_PORT": "0", **(env or {})},
    )


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> re.Match[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r} in output:\n{''.join(seen)}")


def psql(dsn: str, sql: str) -> str:
    result = subprocess.run(
        [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def run_with_config(
    tmp_path: Path, postgres: EmbeddedPostgres, processes: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], int]:
    """`pypooler run --config FILE` in front of the session PostgreSQL: the process and its port."""
    config = tmp_path / "pypooler.toml"
    config.write_text(
        "listen_port = 0\n"
        f'[databases.pypooler_test]\nhost = "{postgres.host}"\nport = {postgres.port}\npool_size = 2\n'
    )
    proc = start_cli("run", "--config", str(config))
    processes.append(proc)
    return proc, int(wait_for_line(proc, r"listening on 127\.0\.0\.1:(\d+)").group(1))


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('listen_port = -1\ndefault_pool_size = 0\nlisen_addr = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "pypooler", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if "config error" in line]
    assert len(problems) == 3, result.stderr
    assert any("listen_port" in p for p in problems)
    assert any("default_pool_size" in p for p in problems)
    assert any("lisen_addr" in p for p in problems)


def test_run_with_config_and_sigint(
    tmp_path: Path, postgres: EmbeddedPostgres, processes: list[subprocess.Popen[str]]
) -> None:
    proc, port = run_with_config(tmp_path, postgres, processes)
    dsn = f"postgresql://postgres@127.0.0.1:{port}/pypooler_test"
    assert psql(dsn, "select 6 * 7") == "42"
    login = wait_for_line(proc, r"login: 127\.0\.0\.1:\d+ db=pypooler_test user=postgres app=psql")
    assert login
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0


def test_run_without_databases_starts_an_embedded_postgres(
    processes: list[subprocess.Popen[str]],
) -> None:
    proc = start_cli("run", env={"PYPOOLER_LISTEN_PORT": "0", "PYPOOLER_CONFIG": ""})
    processes.append(proc)
    dsn = wait_for_line(proc, r"psql '(postgresql://\S+)'", timeout=60).group(1)
    assert psql(dsn, "select current_database()") == "pypooler_test"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_client_supplied_names_cannot_forge_log_lines(
    tmp_path: Path, postgres: EmbeddedPostgres, processes: list[subprocess.Popen[str]]
) -> None:
    proc, port = run_with_config(tmp_path, postgres, processes)
    forged = "x\n2026-12-06 05:00:00,000 CRITICAL pypooler: FORGED LINE"
    result = subprocess.run(
        [PSQL, "-X", "-w", "-h", "127.0.0.1", "-p", str(port), "-U", forged, "-d", forged, "-c", "select 1"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PGAPPNAME": forged},
    )  # fmt: skip
    assert result.returncode != 0  # no such database
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert proc.stdout is not None
    output = proc.stdout.read()
    assert "FORGED LINE" in output  # logged, escaped on its own line
    assert not any(line.startswith("2026-12-06 05:00:00,000 CRITICAL") for line in output.splitlines())


def test_run_reads_a_pgbouncer_ini_as_it_is(
    tmp_path: Path, postgres: EmbeddedPostgres, processes: list[subprocess.Popen[str]]
) -> None:
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\npypooler_test = host={postgres.host} port={postgres.port} pool_size=2\n\n"
        "[pgbouncer]\nlisten_port = 0\nauth_type = trust\npool_mode = transaction\n"
        f"logfile = {tmp_path}/pgbouncer.log\nadmin_users = postgres\n"
    )
    check = subprocess.run(
        [sys.executable, "-m", "pypooler", "check-config", "--config", str(ini)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert check.returncode == 0 and "config ok: 1 database entries" in check.stdout
    assert f"{ini}:8: logfile is not needed by pypooler" in check.stderr
    converted = subprocess.run(
        [sys.executable, "-m", "pypooler", "convert", str(ini)], capture_output=True, text=True, timeout=30
    )
    assert 'pool_mode = "transaction"' in converted.stdout and "logfile is not needed" in converted.stdout
    proc = start_cli("run", "--config", str(ini))
    processes.append(proc)
    port = int(wait_for_line(proc, r"listening on 127\.0\.0\.1:(\d+) \(pool_mode=transaction").group(1))
    assert psql(f"postgresql://postgres@127.0.0.1:{port}/pypooler_test", "select 6 * 7") == "42"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
