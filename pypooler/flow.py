"""Flow control between the two ends of the proxy: a slow reader on one side stops reading on the other.

asyncio calls a protocol's `pause_writing` when its transport's write buffer goes over the high
mark and `resume_writing` when it drains under the low mark. The proxy answers by pausing reading
of the *peer* (a client's transport full: stop reading its server; a server's transport full, as
in a COPY FROM faster than PostgreSQL takes it: stop reading its client), so what pypooler holds
per connection is bounded by about the high mark, never a whole result set.

Rules:
- Both transports get these marks explicitly (`limit_write_buffer`): uvloop's default low mark is
  so small that a paused peer would resume and pause again for every few KiB written.
- `pause_reading` / `resume_reading` are idempotent, keyed on the end's `reading_paused` flag: the
  mark callbacks, a lend to a client that is still over its mark, a release and a client leaving
  may all ask, in any order, and a transport's own pause/resume must be called only on a change.
- A closed end is never touched: its transport may be gone.
- Nothing here runs per message: only when a transport crosses a mark, and at a lend or a release
  when a flag says an end is paused.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol, cast

# High enough that a normal result never pauses, low enough that a slow reader bounds what we
# hold per connection.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024


class FlowEnd(Protocol):
    """One end of the proxy as flow control sees it (ClientConnection, ServerConnection)."""

    transport: asyncio.Transport
    reading_paused: bool  # we paused reading its transport; only this module changes it

    @property
    def closed(self) -> bool: ...


def limit_write_buffer(transport: asyncio.BaseTransport) -> None:
    cast(asyncio.WriteTransport, transport).set_write_buffer_limits(
        high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER
    )


def pause_reading(end: FlowEnd | None) -> None:
    """Stop reading `end` (if any, open, and not paused already)."""
    if end is not None and not end.reading_paused and not end.closed:
        end.reading_paused = True
        end.transport.pause_reading()


def resume_reading(end: FlowEnd | None) -> None:
    """Read `end` again (if any, open, and paused by `pause_reading`)."""
    if end is not None and end.reading_paused and not end.closed:
        end.reading_paused = False
        end.transport.resume_reading()
