"""listen_backlog holds for every listening socket pypooler serves from the event loop: the
event loop's create_server listens again (with 100 unless told), and a serverless fan-out of
thousands of simultaneous connects overflows a queue of 100 into SYN retransmits (1, 3, 7 s)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from tests.support.poolers import RunningPooler

BACKLOG = 777  # below net.core.somaxconn (4096 by default), which caps it


def listen_queue(port: int) -> int:
    """The accept queue length the kernel gives a listening TCP socket: `ss`'s Send-Q."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    queues = {int(line.split()[2]) for line in out.splitlines() if line.strip()}
    assert len(queues) == 1, out
    return queues.pop()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_every_listener_queues_listen_backlog(start_pooler: Callable[..., RunningPooler]) -> None:
    pooler = start_pooler(listen_backlog=BACKLOG, http_listen_addr="127.0.0.1", http_listen_port=0)
    http_port = pooler.pooler.http_port
    assert http_port is not None
    assert listen_queue(pooler.port) == BACKLOG
    assert listen_queue(http_port) == BACKLOG
