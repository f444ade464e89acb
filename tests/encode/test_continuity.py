"""Continuity: the gate that keeps a group's indices and timestamps moving forward only."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import tracks
from orchestrator.clock import TrackClock
from orchestrator.encode.continuity import (
    ClockIdentity,
    Continuity,
    StateMismatch,
    Verdict,
    decode_state,
    encode_state,
)
from orchestrator.fmp4.stream import EncodedFragment

EPOCH = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
VIDEO = TrackClock(EPOCH, Fraction(2), 90000, Fraction(1001, 30000))
AUDIO = TrackClock(EPOCH, Fraction(2), 48000, Fraction(1024, 48000))
CLOCKS = {"av": [VIDEO, AUDIO], "v": [VIDEO]}
IDENTITY = ClockIdentity("demo", EPOCH, Fraction(2))


def on_clock(stream: str, track: int, k: int) -> EncodedFragment:
    clock = CLOCKS[stream][track - 1]
    return EncodedFragment(stream, track, k, clock.start(k), clock.duration(k), clock.timescale, b"x")


def test_fragments_on_the_shared_clock_are_accepted_in_order():
    gate = Continuity(CLOCKS)
    assert gate.judge(on_clock("av", 1, 16)).verdict is Verdict.ACCEPTED
    assert gate.judge(on_clock("av", 2, 16)).verdict is Verdict.ACCEPTED
    assert gate.completed("av") == 16
    assert gate.completed("v") is None


def test_an_index_with_another_timestamp_is_rejected():
    gate = Continuity(CLOCKS)
    good = on_clock("av", 1, 16)
    shifted = EncodedFragment("av", 1, 16, good.start + 3003, good.duration, 90000, b"x")
    judgement = gate.judge(shifted)
    assert judgement.verdict is Verdict.OFF_CLOCK
    assert "the shared clock says (2882880, 177177, 90000)" in judgement.reason  # frames 960..1018
    # k = 16 at 29.97 fps is one of the 59-frame fragments: its duration is 59 * 3003 ticks.
    wrong_length = EncodedFragment("av", 1, 16, good.start, 60 * 3003, 90000, b"x")
    assert gate.judge(wrong_length).verdict is Verdict.OFF_CLOCK
    assert gate.judge(good).verdict is Verdict.ACCEPTED


def test_a_repeated_or_older_index_is_dropped_and_time_never_goes_backwards():
    gate = Continuity(CLOCKS)
    assert gate.judge(on_clock("v", 1, 10)).verdict is Verdict.ACCEPTED
    assert gate.judge(on_clock("v", 1, 10)).verdict is Verdict.REPEAT
    assert gate.judge(on_clock("v", 1, 9)).verdict is Verdict.REPEAT
    judgement = gate.judge(on_clock("v", 1, 14))
    assert (judgement.verdict, judgement.skipped) == (Verdict.ACCEPTED, 3)


def test_unknown_streams_and_tracks_are_rejected():
    gate = Continuity(CLOCKS)
    assert gate.judge(EncodedFragment("v", 2, 1, 0, 0, 48000, b"")).verdict is Verdict.UNKNOWN_TRACK
    assert gate.judge(EncodedFragment("nope", 1, 1, 0, 0, 90000, b"")).verdict is Verdict.UNKNOWN_TRACK


def test_a_new_instance_starts_at_the_live_fragment_or_after_the_last_one_emitted():
    gate = Continuity(CLOCKS)
    assert gate.first_index(live=100) == 100  # nothing emitted yet
    for k in (100, 101):
        for stream, clocks in CLOCKS.items():
            for track in range(1, len(clocks) + 1):
                gate.judge(on_clock(stream, track, k))
    gate.judge(on_clock("v", 1, 102))  # "v" got one further than "av" before the crash
    assert gate.resume_floor() == 102  # the least advanced stream decides; "v" 102 will be a repeat
    assert gate.first_index(live=102) == 102
    assert gate.first_index(live=110) == 110  # down for a while: start live, the gap is reported
    assert gate.first_index(live=95) == 102  # the wall clock stepped back: never reissue 95..101


def test_state_round_trips_and_restores_the_floor():
    gate = Continuity(CLOCKS)
    for k in (7, 8):
        gate.judge(on_clock("av", 1, k))
        gate.judge(on_clock("av", 2, k))
        gate.judge(on_clock("v", 1, k))
    gate.judge(on_clock("av", 1, 9))  # the video track of "av" is one ahead of its audio
    data = encode_state(IDENTITY, "primary", gate.snapshot(), CLOCKS)
    assert b'"time": 1441440' in data  # fragment 8 of the video track starts at frame 480 (480 * 3003)
    restored = decode_state(data, IDENTITY, "primary")
    assert restored == {"av": [9, 8], "v": [8]}
    again = Continuity(CLOCKS, restored)
    assert again.first_index(live=3) == 9
    assert again.judge(on_clock("av", 1, 9)).verdict is Verdict.REPEAT  # already sent: never again
    assert again.judge(on_clock("av", 2, 9)).verdict is Verdict.ACCEPTED


@pytest.mark.parametrize(
    ("identity", "group"),
    [
        (ClockIdentity("other", EPOCH, Fraction(2)), "primary"),
        (ClockIdentity("demo", EPOCH + 1, Fraction(2)), "primary"),
        (ClockIdentity("demo", EPOCH, Fraction(3)), "primary"),
        (IDENTITY, "backup"),
    ],
)
def test_state_from_another_presentation_clock_or_group_is_refused(identity, group):
    data = encode_state(IDENTITY, "primary", {"v": [5]}, CLOCKS)
    with pytest.raises(StateMismatch):
        decode_state(data, identity, group)


@pytest.mark.parametrize("data", [b"", b"{}", b"[1]", b'{"format": 1}', b"\xff"])
def test_a_damaged_state_file_is_a_clear_error(data):
    with pytest.raises(ValueError, match="not a state file"):
        decode_state(data, IDENTITY, "primary")


# --- bookkeeping kept per fragment (constant time at any number of streams) ------------------


THREE = {"avv": [VIDEO, AUDIO, VIDEO]}


def three(track: int, k: int) -> EncodedFragment:
    clock = THREE["avv"][track - 1]
    return EncodedFragment("avv", track, k, clock.start(k), clock.duration(k), clock.timescale, b"x")


def test_completed_is_the_least_advanced_track_as_tracks_advance_and_skip():
    gate = Continuity(THREE)
    steps = [  # (track, index accepted) -> completed after it
        ((1, 5), None), ((2, 3), None), ((3, 4), 3),  # every track has one: the least is 3
        ((1, 6), 3),  # a track ahead moves on: still 3
        ((2, 9), 4),  # the least advanced skips ahead: the next least (track 3) is 4
        ((3, 7), 6),  # now track 1 (6) is the least
        ((1, 7), 7), ((2, 10), 7), ((3, 8), 7), ((1, 12), 8), ((3, 12), 10), ((2, 12), 12),
    ]  # fmt: skip
    for (track, k), expected in steps:
        assert gate.judge(three(track, k)).verdict is Verdict.ACCEPTED
        assert gate.completed("avv") == expected, (track, k)
    # Repeats and off-clock fragments change nothing.
    assert gate.judge(three(2, 11)).verdict is Verdict.REPEAT
    assert gate.judge(EncodedFragment("avv", 1, 13, 0, 1, 90000, b"x")).verdict is Verdict.OFF_CLOCK
    assert gate.completed("avv") == 12


def test_completed_starts_from_the_restored_state():
    gate = Continuity(THREE, restored={"avv": [8, 6, 7]})
    assert gate.completed("avv") == 6
    assert gate.judge(three(1, 9)).verdict is Verdict.ACCEPTED
    assert gate.completed("avv") == 6
    assert gate.judge(three(2, 9)).verdict is Verdict.ACCEPTED
    assert gate.completed("avv") == 7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 30)), max_size=60),
       st.lists(st.integers(0, 30), min_size=3, max_size=3) | st.none())  # fmt: skip
def test_completed_equals_the_minimum_over_tracks_worked_out_afresh(steps, restored):
    gate = Continuity(THREE, restored=None if restored is None else {"avv": restored})
    last: list[int | None] = [None] * 3 if restored is None else list(restored)
    for track, k in steps:
        if gate.judge(three(track, k)).verdict is Verdict.ACCEPTED:
            last[track - 1] = k
        expected = None if None in last else min(t for t in last if t is not None)
        assert gate.completed("avv") == expected


def test_final_reached_counts_the_streams_short_of_the_final_index():
    clocks = {f"s{i}": [VIDEO] for i in range(4)} | THREE
    gate = Continuity(clocks, restored={"s0": [10]})
    assert not gate.final_reached  # nothing to watch yet
    for i in range(1, 4):
        gate.judge(on_clock_of(clocks, f"s{i}", 1, 9))
    gate.watch_final(10)
    assert gate.short_of_final == {"s1", "s2", "s3", "avv"}  # s0 is already at 10
    gate.judge(on_clock_of(clocks, "s1", 1, 10))
    gate.judge(on_clock_of(clocks, "s2", 1, 11))  # past the final index counts too
    assert gate.short_of_final == {"s3", "avv"}
    gate.judge(on_clock_of(clocks, "avv", 1, 10))
    gate.judge(on_clock_of(clocks, "avv", 2, 10))
    assert not gate.final_reached
    gate.judge(on_clock_of(clocks, "avv", 3, 10))  # the stream's last track
    gate.judge(on_clock_of(clocks, "s3", 1, 9))
    assert gate.short_of_final == {"s3"}
    assert not gate.final_reached
    gate.judge(on_clock_of(clocks, "s3", 1, 12))  # a skip over the final index
    assert gate.final_reached
    # Watching an index every stream has completed already: reached at once.
    gate.watch_final(9)
    assert gate.final_reached


def test_final_reached_when_a_lagging_track_skips_past_it():
    """Stream completion moves to the final index on a fragment of another index."""
    gate = Continuity(THREE)
    for track, k in ((1, 10), (2, 8), (3, 9)):
        gate.judge(three(track, k))
    gate.watch_final(10)
    gate.judge(three(2, 12))  # completed: 8 -> 9 (track 3)
    assert not gate.final_reached
    gate.judge(three(3, 11))  # completed: 9 -> 10 (track 1), on a fragment of index 11
    assert (gate.completed("avv"), gate.final_reached) == (10, True)


def on_clock_of(clocks, stream: str, track: int, k: int) -> EncodedFragment:
    clock = clocks[stream][track - 1]
    return EncodedFragment(stream, track, k, clock.start(k), clock.duration(k), clock.timescale, b"x")


# --- sparse tracks: no fragment k for every k, and nothing waits for one -----------------------

CUES = TrackClock(EPOCH, Fraction(2), 1000, Fraction(1, 1000))  # a sparse track's clock: 1 ms ticks
SPARSE_CLOCKS = {"avc": [VIDEO, AUDIO, CUES]}
SPARSE_KINDS = {"avc": [tracks.VIDEO, tracks.AUDIO, tracks.SPARSE]}


def sparse_on_clock(track: int, k: int) -> EncodedFragment:
    clock = SPARSE_CLOCKS["avc"][track - 1]
    return EncodedFragment("avc", track, k, clock.start(k), clock.duration(k), clock.timescale, b"x",
                           continuous=track != 3)  # fmt: skip


def test_a_sparse_track_that_sent_nothing_does_not_hold_the_stream_back():
    gate = Continuity(SPARSE_CLOCKS, kinds=SPARSE_KINDS)
    gate.watch_final(17)
    for k in (16, 17):
        assert gate.judge(sparse_on_clock(1, k)).verdict is Verdict.ACCEPTED
        assert gate.judge(sparse_on_clock(2, k)).verdict is Verdict.ACCEPTED
    assert gate.completed("avc") == 17
    assert gate.final_reached
    assert gate.resume_floor() == 18
    # The state file has an entry for the stream; the silent sparse track's is the completed index.
    assert gate.snapshot() == {"avc": [17, 17, 17]}


def test_a_sparse_track_skips_indices_without_counting_them_and_never_moves_completed():
    gate = Continuity(SPARSE_CLOCKS, kinds=SPARSE_KINDS)
    assert gate.judge(sparse_on_clock(3, 10)).skipped == 0
    assert gate.judge(sparse_on_clock(3, 25)).skipped == 0  # 14 indices without a cue: normal
    assert gate.completed("avc") is None  # the continuous tracks have sent nothing yet
    assert gate.judge(sparse_on_clock(1, 20)).verdict is Verdict.ACCEPTED
    assert gate.judge(sparse_on_clock(2, 20)).verdict is Verdict.ACCEPTED
    assert gate.completed("avc") == 20  # not 25: the sparse track is ahead, and does not count
    assert gate.judge(sparse_on_clock(1, 23)).skipped == 2  # a continuous track's jump still counts
    assert gate.judge(sparse_on_clock(3, 25)).verdict is Verdict.REPEAT
    assert gate.snapshot() == {"avc": [23, 20, 25]}


def test_a_stream_of_sparse_tracks_only_has_completed_its_most_advanced_one():
    gate = Continuity({"cues": [CUES]}, kinds={"cues": [tracks.SPARSE]})
    assert gate.completed("cues") is None
    gate.judge(EncodedFragment("cues", 1, 4, CUES.start(4), CUES.duration(4), 1000, b"x", continuous=False))
    assert gate.completed("cues") == 4


def test_without_kinds_every_track_is_continuous_as_before():
    gate = Continuity(SPARSE_CLOCKS)
    gate.judge(sparse_on_clock(1, 16))
    gate.judge(sparse_on_clock(2, 16))
    assert gate.completed("avc") is None  # the third track gates, as every track did before kinds
    with pytest.raises(ValueError, match="one kind per track"):
        Continuity(SPARSE_CLOCKS, kinds={"avc": [tracks.VIDEO]})
