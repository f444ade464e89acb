"""Garbage collection paced by the shared clock: exact times, and the collector's state in `up`."""

from __future__ import annotations

import gc
import time
from fractions import Fraction

import trio
import trio.testing
from rig import build_profile, loopback_ingest, two_groups, up_in_process, wait_for

from orchestrator.gcpacer import GcPacer, next_collection_ns, paced_collection
from orchestrator.wallclock import TrioWallClock

S = 10**9
EPOCH = 1_767_225_600 * S  # 2026-01-01T00:00:00Z
FRAGMENT_SECONDS = 2  # the rig's profiles


def test_next_collection_is_the_next_middle_of_a_fragment_duration():
    two = Fraction(2)
    assert next_collection_ns(EPOCH, two, EPOCH) == (0, EPOCH + 1 * S)
    assert next_collection_ns(EPOCH, two, EPOCH + 1 * S - 1) == (0, EPOCH + 1 * S)
    assert next_collection_ns(EPOCH, two, EPOCH + 1 * S) == (1, EPOCH + 3 * S)  # strictly after now
    assert next_collection_ns(EPOCH, two, EPOCH + 2 * S + 5) == (1, EPOCH + 3 * S)
    assert next_collection_ns(EPOCH, two, EPOCH + 1_000_001 * S) == (
        500_001,
        EPOCH + 1_000_003 * S,
    )  # 1,000,001 s is one
    # A fragment duration that is not a whole number of nanoseconds: 3.2 s / 3 (rounded down).
    third = Fraction(16, 15)
    k, at = next_collection_ns(EPOCH, third, EPOCH + 10 * S)
    assert (k, at) == (9, EPOCH + 10_133_333_333)
    assert at > EPOCH + 10 * S
    assert at - (EPOCH + 10 * S) <= third * S
    # Before the epoch (a clock set back): still the next middle, never the past.
    assert next_collection_ns(EPOCH, two, EPOCH - 4 * S) == (-2, EPOCH - 3 * S)


def test_paced_collection_freezes_disables_and_restores():
    assert gc.isenabled()
    with paced_collection():
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


async def test_the_pacer_collects_young_generations_mid_fragment_and_everything_every_full_every(autojump_clock):
    wall = TrioWallClock(EPOCH + 10 * S)  # the start of fragment 5 (2 s fragments)
    pacer = GcPacer(EPOCH, Fraction(2), wall, full_every=3)
    times: list[int] = []
    collected: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            times.append(wall.now_ns())
            collected.append(info["generation"])

    with paced_collection():
        gc.callbacks.append(record)  # after the collection that paced_collection itself makes
        try:
            with trio.move_on_after(12.5):  # until EPOCH + 22.5 s
                await pacer.run()
        finally:
            gc.callbacks.remove(record)
    assert times == [EPOCH + t * S for t in (11, 13, 15, 17, 19, 21)]  # the middles of fragments 5..10
    assert collected == [1, 2, 1, 1, 2, 1]  # fragments 6 and 9 (multiples of 3): everything
    assert pacer.collections == [4, 2]


async def test_up_collects_mid_fragment_with_automatic_collection_off(tmp_path):
    """``up`` turns automatic collection off; only the pacer's task collects after that. A real
    ``up`` (one synthetic group, a loopback ingest server) collects at the middle of a fragment
    duration on the shared clock: without the pacer nothing would collect cyclic garbage for the
    life of the process."""
    collections: list[tuple[int, int]] = []  # (wall ns, generation)
    period = FRAGMENT_SECONDS * S

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append((time.time_ns(), info["generation"]))

    def mid_fragment() -> list[tuple[int, int]]:
        """The collections within half a second of the middle of a fragment duration (the pacer
        sleeps until then on the system wall clock; a loaded machine wakes it late)."""
        return [(at, generation) for at, generation in collections
                if abs((at - EPOCH) % period - period // 2) < S // 2]  # fmt: skip

    async with loopback_ingest(tmp_path / "archive") as ingest:
        profile = build_profile(groups=two_groups(ingest.port))
        assert profile.presentation.epoch_ns == EPOCH
        async with up_in_process(profile, groups=["primary"]):
            assert not gc.isenabled()
            gc.callbacks.append(record)  # after up's own collect-and-freeze at start
            try:
                # The next middle of a fragment duration is at most one fragment duration away.
                await wait_for(mid_fragment, 2 * FRAGMENT_SECONDS + 1, "a collection mid-fragment while up runs")
            finally:
                gc.callbacks.remove(record)
    assert gc.isenabled()  # restored when up returned
    assert {generation for _, generation in mid_fragment()} <= {1, 2}
