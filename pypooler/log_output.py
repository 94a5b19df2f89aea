"""Log output for `pypooler run`: every line in order, written in batches, none forged.

Rules this module keeps:
- One writer for every line. `install()` puts a `BufferedLineHandler` on the root logger; it
  and `connection_line` append to the same list, which one `write` and one `flush` empty: at the
  end of the event-loop iteration that made a line through `logging` (warnings, errors: what an
  operator may be waiting for), and within `CONNECTION_LINES_DELAY_S` of a connection line
  (`login:`/`closing:`, two per connection and the bulk of the log), so that a client per
  transaction costs a share of one system call rather than one per loop iteration. Lines stay
  in the order they were made; `flush()` at shutdown writes the rest, and without a running
  loop (start-up, after the loop ends) lines are written at once.
- The two lines of every connection (`login:`, `closing:`, on by default) skip the logging
  machinery (LogRecord, handler lock, formatter): `connection_line` writes the same text the
  formatter would, with a timestamp string made once per second. Where `install()` was not
  called (the tests, an embedding program) they go through `logging` as any line.
- Nothing a client sends can forge a line: every message is escaped (`escape`: control
  characters and line separators as `\\xNN`/`\\uNNNN`), so a database, user or application_name
  with a newline stays inside its own line. Tracebacks, which pypooler adds itself, keep theirs.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from typing import Final, TextIO

FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# How late a connection line may reach the log (see the module rules; bench/logcost).
CONNECTION_LINES_DELAY_S: Final = 0.02

# Control characters (C0, DEL, C1) and Unicode line separators, as Python escapes them.
_ESCAPES: Final = {
    code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x85]
}


def escape(text: str) -> str:
    """`text` on one line: control characters and line separators escaped."""
    return text if text.isprintable() else text.translate(_ESCAPES)


class LineWriter:
    """Lines to one stream, written in batches (see the module rules)."""

    __slots__ = ("_delayed", "_lines", "_lock", "_soon", "stream")

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._soon = False  # a flush is due at the end of this loop iteration
        self._delayed: asyncio.TimerHandle | None = None  # a flush due within the delay
        # A line may come from another thread (an executor's); the loop's own lines are the rule.
        self._lock = threading.Lock()

    def write(self, line: str, *, may_wait: bool = False) -> None:
        """Queue `line`; `may_wait`: it may wait up to CONNECTION_LINES_DELAY_S for company."""
        with self._lock:
            self._lines.append(line)
            if self._soon or (may_wait and self._delayed is not None):
                return
            loop: asyncio.AbstractEventLoop | None
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            else:
                if may_wait:
                    self._delayed = loop.call_later(CONNECTION_LINES_DELAY_S, self.flush)
                else:
                    self._soon = True
                    loop.call_soon(self.flush)
        if loop is None:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            self._soon = False
            if self._delayed is not None:
                self._delayed.cancel()
                self._delayed = None
            lines = self._lines
            if not lines:
                return
            self._lines = []
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # the log's reader went away, or the stream was closed
                pass


class EscapingFormatter(logging.Formatter):
    """The usual format, with the message escaped (see `escape`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class BufferedLineHandler(logging.Handler):
    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.writer.flush()


_writer: LineWriter | None = None
_client_log: Final = logging.getLogger("pypooler.client")
_stamp_second = -1
_stamp_prefix = ""
_stamp_ms = -1
_stamp = ""


def install(level: str | int, stream: TextIO = sys.stderr) -> LineWriter:
    """Send every log line (root logger) through one `LineWriter` on `stream`."""
    global _writer
    writer = _writer = LineWriter(stream)
    handler = BufferedLineHandler(writer)
    handler.setFormatter(EscapingFormatter(FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    atexit.register(writer.flush)
    return writer


def flush() -> None:
    if _writer is not None:
        _writer.flush()


def _timestamp() -> str:
    """logging's default asctime ("2026-12-06 05:00:00,123"): the date part made once a second,
    the whole once a millisecond (a burst of logins shares it)."""
    global _stamp_ms, _stamp_second, _stamp_prefix, _stamp
    ms = int(time.time() * 1000)
    if ms == _stamp_ms:
        return _stamp
    second = ms // 1000
    if second != _stamp_second:
        _stamp_second = second
        _stamp_prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
    _stamp_ms = ms
    _stamp = f"{_stamp_prefix},{ms % 1000:03d}"
    return _stamp


def connection_line(
    event: str, peer: str, database: str, user: str, application_name: str, tail: str = ""
) -> None:
    """`event: peer db=... user=... app=...tail` at INFO from pypooler.client (see the module rules)."""
    if not _client_log.isEnabledFor(logging.INFO):
        return
    text = f"{event}: {peer} db={escape(database)} user={escape(user)} app={escape(application_name)}{tail}"
    writer = _writer
    if writer is None:
        _client_log.info("%s", text)
    else:
        writer.write(f"{_timestamp()} INFO pypooler.client: {text}\n", may_wait=True)
