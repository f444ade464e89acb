"""Wall-clock time for the trio shells, behind one small seam.

The shared clock is defined on wall-clock time (nanoseconds since the Unix epoch). Shells read
and wait for it through a :class:`WallClock` so tests can run on trio's autojump ``MockClock``:
:class:`TrioWallClock` derives wall time from ``trio.current_time()``, which the mock clock
advances instantly.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio


class WallClock(Protocol):
    def now_ns(self) -> int: ...

    async def sleep_until_ns(self, deadline_ns: int) -> None: ...


class SystemWallClock:
    """The host's real-time clock (``time.time_ns``); what production uses."""

    def now_ns(self) -> int:
        return time.time_ns()

    async def sleep_until_ns(self, deadline_ns: int) -> None:
        """Sleep until the wall clock reaches ``deadline_ns``. Re-checks after waking, so a wall
        clock stepped backwards while asleep makes it wait longer, never return early.
        Cancellation: returns nothing, raises Cancelled as trio.sleep does."""
        # A loop, not an Event: nothing signals "the wall clock reached X"; we re-read it.
        while (remaining := deadline_ns - time.time_ns()) > 0:  # noqa: ASYNC110
            await trio.sleep(remaining / 1e9)


class TrioWallClock:
    """Wall time = ``origin_ns`` + trio's clock; for tests on the autojump clock."""

    def __init__(self, origin_ns: int) -> None:
        self._origin_ns = origin_ns - round(trio.current_time() * 1e9)

    def now_ns(self) -> int:
        return self._origin_ns + round(trio.current_time() * 1e9)

    async def sleep_until_ns(self, deadline_ns: int) -> None:
        await trio.sleep_until((deadline_ns - self._origin_ns) / 1e9)
