"""A clock that stands still until a test moves it: pass it where the code takes a clock
(a callable returning monotonic nanoseconds), then set `now`."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: int = 0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now
