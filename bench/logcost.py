"""What the two log lines of a connection cost: `python -m bench.logcost [N]`.

A login and a closing line (log_connections, log_disconnections: on by default) per connection,
written to a file the way `pypooler run` writes its log, timed in this process (CPU time, so
the machine's other load matters less than in a whole-process benchmark):

- `logging`: the standard library's handler and formatter (`logging.basicConfig`), which
  pypooler used before log_output.py: a LogRecord, a lock, a format and a flush per line;
- `log_output`: `log_output.install()` and `connection_line`, as `pypooler run` does now (the
  lines written in batches, see log_output.py);
- `off`: neither line (log_connections = false), the floor.

Each twice: 20 connections per event-loop iteration (a burst of logins) and one (a client per
transaction, `pgbench -C`: before batching across iterations, one write per connection).
Prints µs of CPU per connection for each. It measures and prints; it never asserts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time

from pypooler import log_output

PER_ITERATION = (20, 1)  # connections logged per event-loop iteration
PEER = "127.0.0.1:54321"


def reset_logging() -> None:
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    log_output._writer = None


async def run_connections(n: int, log_lines: str, per_iteration: int) -> float:
    log = logging.getLogger("pypooler.client")
    started = time.process_time()
    for index in range(n):
        if log_lines == "logging":
            log.info("login: %s db=%s user=%s app=%s", PEER, "app", "app_user", "pgbench")
            log.info("closing: %s db=%s user=%s app=%s age=%.3fs", PEER, "app", "app_user", "pgbench", 0.004)
        elif log_lines == "log_output":
            log_output.connection_line("login", PEER, "app", "app_user", "pgbench")
            log_output.connection_line("closing", PEER, "app", "app_user", "pgbench", f" age={0.004:.3f}s")
        if index % per_iteration == per_iteration - 1:
            await asyncio.sleep(0)  # the loop turns
    log_output.flush()
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    with tempfile.TemporaryDirectory() as directory:
        results: dict[tuple[str, int], list[float]] = {}
        for per_iteration in PER_ITERATION:
            for kind in ("off", "logging", "log_output", "off", "logging", "log_output"):
                path = os.path.join(directory, f"{kind}.log")
                with open(path, "w") as stream:
                    reset_logging()
                    if kind == "logging":
                        logging.basicConfig(level="INFO", format=log_output.FORMAT, stream=stream)
                    else:
                        log_output.install("INFO", stream)
                    cost = asyncio.run(run_connections(n, kind, per_iteration))
                    results.setdefault((kind, per_iteration), []).append(cost)
        reset_logging()
    for (kind, per_iteration), costs in results.items():
        print(
            f"{kind:10} {per_iteration:2} per iteration: {min(costs):6.2f} µs of CPU per connection"
            f" (best of {len(costs)}, {n} connections)"
        )


if __name__ == "__main__":
    main()
