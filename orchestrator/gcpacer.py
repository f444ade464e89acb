"""Garbage collection paced by the shared clock, in the quiet middle of each fragment duration.

Why. CPython's cyclic collector runs when allocation counts cross its thresholds, that is at
arbitrary moments, and most allocations happen in the burst at each fragment boundary (every
stream's fragment falls due at the same instant, and every POST writes it). Measured with 1,000
streams (4,000 POSTs, about 700,000 objects tracked by the collector): a full collection stops
the event loop for 0.2-0.4 s and came every ~20 s, younger ones every few hundred ms, about a
twentieth of ``up``'s CPU in all; a pause that falls in a burst delays every fragment after it.

Operation. :func:`paced_collection` (a context manager around the groups' run) collects once,
then freezes what exists (the profile, publishers, outboxes, metrics: built at start, never
garbage, so later collections do not walk them again) and turns automatic collection off.
:meth:`GcPacer.run` then collects the young generations at the middle of every fragment
duration on the shared clock (``epoch + (k + 1/2)·D``), when the burst of fragment k is long
over and fragment k + 1 is not due yet, and all generations every ``full_every`` fragments. On
the way out the collector is restored as it was (tests run ``up`` in-process).

Garbage that is not cyclic is freed at once by reference counting as always; cyclic garbage now
waits at most one fragment duration (a full generation at most ``full_every`` of them).

:func:`next_collection_ns` is pure (integer nanoseconds); the rest is a thin trio shell.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from fractions import Fraction

from orchestrator.wallclock import WallClock

log = logging.getLogger(__name__)

FULL_EVERY = 30  # fragments between full collections (a minute at 2 s fragments)


def next_collection_ns(epoch_ns: int, fragment_duration: Fraction, now_ns: int) -> tuple[int, int]:
    """The first middle of a fragment duration strictly after ``now_ns``: ``(k, epoch + (k + 1/2)·D)``
    in integer nanoseconds (rounded down), with k the index of the fragment it falls in."""
    period = fragment_duration * 10**9
    k = int((Fraction(now_ns - epoch_ns) - period / 2) // period) + 1
    at = epoch_ns + int((k + Fraction(1, 2)) * period)
    if at <= now_ns:  # rounding: never return the present or the past
        k += 1
        at = epoch_ns + int((k + Fraction(1, 2)) * period)
    return k, at


@contextlib.contextmanager
def paced_collection() -> Iterator[None]:
    """Collect and freeze what exists now, turn automatic collection off; restore on exit."""
    was_enabled = gc.isenabled()
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("gc.frozen objects=%d seconds=%.3f", gc.get_freeze_count(), time.perf_counter() - started)
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


class GcPacer:
    """Collects at the middle of every fragment duration (see the module docstring)."""

    def __init__(self, epoch_ns: int, fragment_duration: Fraction, wall: WallClock, full_every: int = FULL_EVERY):
        self.epoch_ns = epoch_ns
        self.fragment_duration = fragment_duration
        self.wall = wall
        self.full_every = full_every
        self.collections = [0, 0]  # young, full: what the tests and the debug log look at

    async def run(self) -> None:
        """Collect on the shared clock until cancelled. Cancellation: stops between collections
        (a collection is synchronous: it is never interrupted)."""
        while True:
            k, at = next_collection_ns(self.epoch_ns, self.fragment_duration, self.wall.now_ns())
            await self.wall.sleep_until_ns(at)
            full = k % self.full_every == 0
            started = time.perf_counter()
            found = gc.collect(2 if full else 1)
            self.collections[full] += 1
            log.debug("gc.collected generation=%d unreachable=%d seconds=%.3f", 2 if full else 1, found,
                      time.perf_counter() - started)  # fmt: skip
