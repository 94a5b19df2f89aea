"""Rate limits for log lines a client can cause again and again.

A client retrying a refused login (a replication client, a port scanner, a driver with a wrong
password in a loop) must not fill the disk: one client once wrote 64,580 identical WARNING lines
in ten minutes. Every warning or info line that a client can trigger repeatedly goes through one
`LogLimiter`, keyed by what makes lines "the same" (the error's reason, database and user; not
the client's address, which changes with every retry).

Rules:
- Per key, at most `lines` lines per `interval` seconds are written; the rest are counted.
- When the key's interval is over, one summary line says how many were suppressed and repeats
  the last of them: at the key's next line, or at `flush` (the maintenance pass), whichever
  comes first. A key that went quiet therefore still reports what it suppressed.
- At most `max_keys` keys are tracked; past that, new keys share one overflow key, so a flood
  of distinct users is bounded too.
- Nothing here runs on the forwarding path: only refused logins, protocol errors and the like.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

# Defaults: enough lines to see a pattern, then one line per minute per key.
LINES_PER_INTERVAL = 10
INTERVAL_S = 60.0
MAX_KEYS = 1000
_OVERFLOW = ("*overflow*",)
_NS_PER_S = 1_000_000_000


class _Window:
    __slots__ = ("args", "level", "logger", "message", "start_ns", "suppressed", "written")

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.written = 0
        self.suppressed = 0
        # The last suppressed line, formatted only if a summary is written.
        self.logger: logging.Logger | None = None
        self.level = logging.INFO
        self.message = ""
        self.args: tuple[object, ...] = ()


class LogLimiter:
    """At most `lines` lines per key per `interval` seconds, then one summary (see the module
    docstring). `clock` returns nanoseconds (monotonic); tests pass a fake one."""

    __slots__ = ("_clock", "_windows", "interval_ns", "lines", "max_keys")

    def __init__(
        self,
        lines: int = LINES_PER_INTERVAL,
        interval: float = INTERVAL_S,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.lines = lines
        self.interval_ns = int(interval * _NS_PER_S)
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def log(self, logger: logging.Logger, level: int, key: Hashable, message: str, *args: object) -> bool:
        """Write `message % args` at `level` unless `key` is over its limit; True if written."""
        if not logger.isEnabledFor(level):
            return False
        now = self._clock()
        windows = self._windows
        window = windows.get(key)
        if window is None and len(windows) >= self.max_keys:
            self.flush(now)  # expired windows make room first
            if len(windows) >= self.max_keys:
                key = _OVERFLOW
                window = windows.get(key)
        if window is not None and now - window.start_ns >= self.interval_ns:
            self._summarise(window)
            window = None
        if window is None:
            window = windows[key] = _Window(now)
        if window.written < self.lines:
            window.written += 1
            logger.log(level, message, *args)
            return True
        window.suppressed += 1
        window.logger = logger
        window.level = level
        window.message = message
        window.args = args
        return False

    def flush(self, now_ns: int | None = None) -> None:
        """Write the summaries of windows whose interval is over, and forget those windows."""
        now = self._clock() if now_ns is None else now_ns
        windows = self._windows
        expired = [key for key, window in windows.items() if now - window.start_ns >= self.interval_ns]
        for key in expired:
            self._summarise(windows.pop(key))

    def _summarise(self, window: _Window) -> None:
        logger = window.logger
        if not window.suppressed or logger is None:
            return
        logger.log(
            window.level,
            "%d similar lines suppressed in %g s; the last: " + window.message,
            window.suppressed, self.interval_ns / _NS_PER_S, *window.args,
        )  # fmt: skip
        window.suppressed = 0
