"""pypooler.log_output: lines in order, written in batches, nothing forged."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator

import pytest

from pypooler import log_output


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def installed() -> Iterator[CountingStream]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = CountingStream()
    log_output.install(logging.INFO, stream)
    try:
        yield stream
    finally:
        log_output.flush()
        log_output._writer = None
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("app", "app"), ("é ü 中", "é ü 中"), ("a\nb", "a\\x0ab"),
     ("x\r\n2026 CRITICAL", "x\\x0d\\x0a2026 CRITICAL"), ("\x1b[31mred", "\\x1b[31mred"),
     ("line\u2028sep", "line\\u2028sep")],
)  # fmt: skip
def test_escape_keeps_a_value_on_one_line(text: str, escaped: str) -> None:
    assert log_output.escape(text) == escaped


async def test_lines_of_one_loop_iteration_are_one_write_in_order(installed: CountingStream) -> None:
    log = logging.getLogger("pypooler.test")
    log.info("first")
    log_output.connection_line("login", "127.0.0.1:1", "db", "user", "app")
    log.warning("third")
    assert installed.getvalue() == ""  # not yet: at the end of this iteration
    await asyncio.sleep(0)
    lines = installed.getvalue().splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        "pypooler.test: first", "pypooler.client: login: 127.0.0.1:1 db=db user=user app=app",
        "pypooler.test: third",
    ]  # fmt: skip
    assert installed.writes == 1


def test_without_a_loop_lines_are_written_at_once(installed: CountingStream) -> None:
    logging.getLogger("pypooler.test").info("now")
    assert installed.getvalue().endswith("INFO pypooler.test: now\n")


def test_the_connection_line_reads_as_the_formatter_writes(installed: CountingStream) -> None:
    log_output.connection_line("closing", "127.0.0.1:5", "d", "u", "a", " age=0.001s")
    usual_format = "closing: %s db=%s user=%s app=%s age=0.001s"
    logging.getLogger("pypooler.client").info(usual_format, "127.0.0.1:5", "d", "u", "a")
    fast, usual = installed.getvalue().splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert re.match(stamp, fast) and re.match(stamp, usual)
    assert fast[24:] == usual[24:]


def test_client_supplied_values_cannot_forge_a_line(installed: CountingStream) -> None:
    forged = "x\n2026-12-06 05:00:00,000 CRITICAL pypooler: FORGED LINE"
    log_output.connection_line("login", "127.0.0.1:1", forged, forged, forged)
    logging.getLogger("pypooler.client").warning("client %s db=%s: refused", "127.0.0.1:1", forged)
    lines = installed.getvalue().splitlines()
    assert len(lines) == 2
    assert not any(line.startswith("2026-12-06 05:00:00,000 CRITICAL") for line in lines)


def test_below_the_level_nothing_is_written(installed: CountingStream) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    log_output.connection_line("login", "127.0.0.1:1", "db", "user", "app")
    assert installed.getvalue() == ""


async def test_connection_lines_wait_a_little_for_company(installed: CountingStream) -> None:
    # A client per transaction logs two lines per connection, one connection per loop
    # iteration: they share a write instead of making one each.
    for port in range(1, 6):
        log_output.connection_line("login", f"127.0.0.1:{port}", "db", "user", "app")
        await asyncio.sleep(0)
    assert installed.getvalue() == ""
    await asyncio.sleep(log_output.CONNECTION_LINES_DELAY_S * 2)
    assert [line.split(" ")[5] for line in installed.getvalue().splitlines()] == [
        f"127.0.0.1:{port}" for port in range(1, 6)
    ]
    assert installed.writes == 1


async def test_a_warning_takes_the_waiting_connection_lines_along_in_order(installed: CountingStream) -> None:
    log_output.connection_line("login", "127.0.0.1:1", "db", "user", "app")
    logging.getLogger("pypooler.test").warning("then this")
    await asyncio.sleep(0)
    lines = installed.getvalue().splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        "pypooler.client: login: 127.0.0.1:1 db=db user=user app=app", "pypooler.test: then this",
    ]  # fmt: skip
    await asyncio.sleep(log_output.CONNECTION_LINES_DELAY_S * 2)
    assert installed.writes == 1
