"""`pypooler run` as a process: its configuration file, the process with its output collected,
a factory that starts them, and a client and /metrics reader for it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg

from pypooler.embedded import EmbeddedPostgres, random_free_port

free_port = random_free_port  # below the ephemeral range


class PoolerProcess:
    """`python -m pypooler run --config FILE`, its output collected by a thread (so a silent
    process cannot block a test), stopped by its PID at the end."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYPOOLER_", "PG"))}
        self.proc = subprocess.Popen(
            self.command(config),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def command(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "pypooler", "run", "--config", str(config)]

    def drain_output(self) -> None:
        """Move every line read so far into `seen`."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.seen)}")

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def write_config(
    path: Path, postgres: EmbeddedPostgres, port: int, metrics_port: int, **settings: object
) -> None:
    # The unix socket beside the file: a pooler the teardown has to kill leaves no file in /tmp.
    top = {
        "listen_port": port, "metrics_port": metrics_port, "log_connections": "false",
        "unix_socket_dir": f'"{path.parent}"', **settings,
    }  # fmt: skip
    path.write_text(
        "".join(f"{key} = {value}\n" for key, value in top.items())
        + f'[databases.pypooler_test]\nhost = "{postgres.host}"\nport = {postgres.port}\npool_size = 2\n'
    )


class PoolerFactory:
    """start(**settings) -> (process, config file, client DSN, metrics URL); all stopped at the end."""

    def __init__(self, tmp_path: Path, postgres: EmbeddedPostgres) -> None:
        self.tmp_path = tmp_path
        self.postgres = postgres
        self.started: list[PoolerProcess] = []

    def __call__(self, **settings: object) -> tuple[PoolerProcess, Path, str, str]:
        port, metrics_port = free_port(), free_port()
        config = self.tmp_path / f"pypooler-{len(self.started)}.toml"
        write_config(config, self.postgres, port, metrics_port, **settings)
        process = PoolerProcess(config)
        self.started.append(process)
        process.wait_for(r"listening on 127\.0\.0\.1:\d+")
        dsn = f"postgresql://postgres@127.0.0.1:{port}/pypooler_test"
        return process, config, dsn, f"http://127.0.0.1:{metrics_port}"


def connect(dsn: str, *, autocommit: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, prepare_threshold=None, connect_timeout=5, autocommit=autocommit)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
