"""flow.py: pausing and resuming reading of one end is idempotent, never touches a closed end,
and the write-buffer marks are the ones both sides of the proxy get. Fake transports only."""

from __future__ import annotations

import asyncio

from pypooler import flow
from pypooler.flow import WRITE_HIGH_WATER, WRITE_LOW_WATER


class CountingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.limits: tuple[int | None, int | None] | None = None

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)


class End:
    """What flow control needs of a connection, and nothing more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport = CountingTransport()
        self.reading_paused = False
        self.closed = False

    @property
    def calls(self) -> list[str]:
        transport = self.transport
        assert isinstance(transport, CountingTransport)
        return transport.calls


def test_pause_and_resume_reach_the_transport_once_per_change() -> None:
    end = End()

    flow.pause_reading(end)
    flow.pause_reading(end)  # the mark callback and a lend may both ask
    assert end.reading_paused and end.calls == ["pause"]

    flow.resume_reading(end)
    flow.resume_reading(end)
    assert not end.reading_paused and end.calls == ["pause", "resume"]


def test_resume_without_a_pause_does_nothing() -> None:
    end = End()
    flow.resume_reading(end)
    assert end.calls == [] and not end.reading_paused


def test_a_closed_end_is_never_touched() -> None:
    end = End()
    flow.pause_reading(end)
    end.closed = True

    flow.resume_reading(end)
    assert end.calls == ["pause"] and end.reading_paused  # left as it was: the transport is gone

    fresh = End()
    fresh.closed = True
    flow.pause_reading(fresh)
    assert fresh.calls == [] and not fresh.reading_paused


def test_no_peer_is_no_op() -> None:
    flow.pause_reading(None)
    flow.resume_reading(None)


def test_write_buffer_marks() -> None:
    transport = CountingTransport()
    flow.limit_write_buffer(transport)
    assert transport.limits == (WRITE_HIGH_WATER, WRITE_LOW_WATER)
    assert 0 < WRITE_LOW_WATER < WRITE_HIGH_WATER
