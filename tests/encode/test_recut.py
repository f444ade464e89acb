"""The re-cutting core, exact integers: anchors, first fragment, boundaries, cuts."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.clock import NS_PER_SECOND, TrackClock
from orchestrator.encode.recut import (
    TrackRecutter,
    anchor_frame,
    first_fragment_from,
    keyframe_boundary,
    opens_fragment,
    start_index,
)
from orchestrator.fmp4.boxes import Sample

EPOCH = 1_767_225_600 * NS_PER_SECOND
NTSC = TrackClock(EPOCH, Fraction(2), 90000, Fraction(1001, 30000))  # 59.94 frames per fragment
AAC = TrackClock(EPOCH, Fraction(2), 48000, Fraction(1024, 48000))
PAL = TrackClock(EPOCH, Fraction(2), 90000, Fraction(1, 25))  # 50 frames per fragment
CLOCKS = [NTSC, AAC, PAL, TrackClock(EPOCH, Fraction(3), 44100, Fraction(1024, 44100))]


@pytest.mark.parametrize("clock", CLOCKS)
def test_anchor_is_the_first_frame_starting_at_or_after_now(clock):
    for offset_ns in [0, 1, 33_366_666, 33_366_667, 2 * NS_PER_SECOND, 123_456_789_012]:
        now = EPOCH + offset_ns
        n = anchor_frame(clock, now)
        assert clock.frame_time(n) >= clock.tick_at(now)  # to the tick: finer means nothing to media
        assert n == 0 or clock.frame_time(n - 1) < clock.tick_at(now)


@given(frame=st.integers(min_value=0, max_value=10**9))
def test_first_fragment_from_frame_is_the_lowest_index_starting_there_or_later(frame):
    for clock in CLOCKS:
        k = first_fragment_from(clock, frame)
        assert clock.first_frame(k) >= frame
        assert clock.first_frame(k - 1) < frame


def test_start_index_is_common_to_all_tracks_and_never_below_the_request():
    now = EPOCH + 3_000_000_000  # 3 s in: fragment 1 is in flight, 2 is the first whole one
    anchors = [anchor_frame(c, now) for c in (NTSC, AAC)]
    assert start_index([NTSC, AAC], anchors, 0) == 2
    assert start_index([NTSC, AAC], anchors, 5) == 5
    exactly_on_boundary = EPOCH + 2 * NS_PER_SECOND
    anchors = [anchor_frame(c, exactly_on_boundary) for c in (PAL, AAC)]
    assert start_index([PAL, AAC], anchors, 0) == 1


@pytest.mark.parametrize("clock", CLOCKS)
def test_boundary_rule_matches_the_clock(clock):
    firsts = {clock.first_frame(k) for k in range(0, 400)}
    last = clock.first_frame(399)
    assert {n for n in range(0, last + 1) if opens_fragment(clock, n)} == firsts
    assert keyframe_boundary(clock) == clock.frame_duration / clock.fragment_duration


def samples(count: int, *, sync_every: int = 0) -> list[Sample]:
    return [Sample(bytes([i % 256]), 1, is_sync=sync_every == 0 or i % sync_every == 0) for i in range(count)]


def test_cuts_carry_the_clock_times_and_durations_not_the_encoders():
    anchor = NTSC.first_frame(10) - 5  # 5 frames before fragment 10: discarded
    recutter = TrackRecutter(NTSC, anchor=anchor, first_index=10)
    cuts = [c for s in samples(5 + 60 + 60 + 60) if (c := recutter.push(s)) is not None]
    assert [c.index for c in cuts] == [10, 11, 12]
    assert recutter.discarded == 5
    for cut in cuts:
        assert cut.start == NTSC.start(cut.index)
        assert cut.duration == NTSC.duration(cut.index)
        assert [s.duration for s in cut.samples] == NTSC.sample_durations(cut.index)
    assert [len(c.samples) for c in cuts] == [NTSC.frame_count(k) for k in (10, 11, 12)]
    # Sample bytes go through untouched, in order: the 6th sample pushed is the first kept.
    assert cuts[0].samples[0].data == bytes([5])


def test_priming_frames_are_dropped_before_the_anchor_counts():
    k = 7
    recutter = TrackRecutter(AAC, anchor=AAC.first_frame(k), first_index=k, priming_frames=1)
    pushed = samples(1 + AAC.frame_count(k))
    cuts = [c for s in pushed if (c := recutter.push(s)) is not None]
    assert len(cuts) == 1
    assert cuts[0].samples[0].data == bytes([1])  # sample 0 was the priming frame
    assert cuts[0].start == AAC.start(k)


def test_a_fragment_that_does_not_open_with_a_keyframe_is_flagged():
    k = 3
    recutter = TrackRecutter(PAL, anchor=PAL.first_frame(k) - 1, first_index=k)
    # Keyframes on frames 0, 50, 100 of the encoder: one frame early for the shared clock.
    cuts = [c for s in samples(1 + 100, sync_every=50) if (c := recutter.push(s)) is not None]
    assert [c.starts_with_keyframe for c in cuts] == [False, False]
    recutter = TrackRecutter(PAL, anchor=PAL.first_frame(k), first_index=k)
    cuts = [c for s in samples(100, sync_every=50) if (c := recutter.push(s)) is not None]
    assert [c.starts_with_keyframe for c in cuts] == [True, True]


def test_composition_offsets_are_dropped():
    recutter = TrackRecutter(PAL, anchor=0, first_index=0)
    cuts = [recutter.push(Sample(b"x", 3600, True, composition_offset=7200)) for _ in range(50)]
    assert cuts[-1] is not None
    assert {s.composition_offset for s in cuts[-1].samples} == {0}


def test_a_first_index_before_the_anchor_is_refused():
    with pytest.raises(ValueError, match="before the anchor"):
        TrackRecutter(PAL, anchor=PAL.first_frame(4) + 1, first_index=4)
