"""Continuity: the gate that keeps a group's indices and timestamps moving forward only."""

from fractions import Fraction

import pytest

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
