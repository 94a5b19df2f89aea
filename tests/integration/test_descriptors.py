"""Running out of file descriptors (pypooler/accepting.py): a `pypooler run` process started
with a low open files limit warns at start, counts and logs (rate-limited) the accepts that
fail, keeps the clients it could not take in the listen backlog, and serves again once clients
leave."""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

from pypooler.embedded import EmbeddedPostgres
from tests.support.processes import PoolerProcess, connect, free_port, metric, write_config

OPEN_FILES = 64  # soft = hard: pypooler cannot raise it
CLIENTS = 100  # more than fit


class LimitedPoolerProcess(PoolerProcess):
    """PoolerProcess with RLIMIT_NOFILE soft = hard = OPEN_FILES, set in the child itself."""

    def __init__(self, config: Path, open_files: int) -> None:
        self.open_files = open_files
        super().__init__(config)

    def command(self, config: Path) -> list[str]:
        launcher = (
            "import resource, runpy, sys;"
            f" resource.setrlimit(resource.RLIMIT_NOFILE, ({self.open_files}, {self.open_files}));"
            " sys.argv = ['pypooler', 'run', '--config', sys.argv[1]];"
            " runpy.run_module('pypooler', run_name='__main__')"
        )
        return [sys.executable, "-c", launcher, str(config)]


def test_out_of_descriptors_is_counted_logged_and_survived(
    tmp_path: Path, postgres: EmbeddedPostgres
) -> None:
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "pypooler.toml"
    write_config(config, postgres, port, metrics_port)
    process = LimitedPoolerProcess(config, OPEN_FILES)
    held: list[socket.socket] = []
    try:
        process.wait_for(rf"open files limit: {OPEN_FILES}\b")
        warning = process.wait_for(r"open files limit \d+ is below what the configuration may need")
        assert "max_client_conn 1000" in warning.string
        process.wait_for(r"listening on 127\.0\.0\.1:\d+")
        dsn = f"postgresql://postgres@127.0.0.1:{port}/pypooler_test"
        with connect(dsn, autocommit=True) as conn:  # a pool and its server, before the flood
            assert conn.execute("SELECT 1").fetchone() == (1,)

        for _ in range(CLIENTS):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        process.wait_for(r"cannot accept a client connection: .*listen backlog")
        time.sleep(3)  # passes retry accepting ten times a second, all failing
        for sock in held:
            sock.close()
        held.clear()

        # Clients left: the pooler serves again (the backlog drains, then new clients).
        deadline = time.monotonic() + 10
        while True:
            try:
                with connect(dsn, autocommit=True) as conn:
                    assert conn.execute("SELECT 42").fetchone() == (42,)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        metrics = f"http://127.0.0.1:{metrics_port}"
        failures = metric(metrics, "pypooler_accept_failures_total")
        process.drain_output()
        lines = [line for line in process.seen if re.search(r"cannot accept a client connection", line)]
        # Bounded: the log limiter's 10 lines a minute per reason, not one per failure.
        assert 1 <= len(lines) <= 10 < failures
        assert process.proc.poll() is None
    finally:
        for sock in held:
            sock.close()
        process.stop()
