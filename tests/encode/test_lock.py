"""The content lock's arithmetic: file loop timing, the ffconcat list, positions, expressions."""

from __future__ import annotations

from fractions import Fraction

import pytest

from orchestrator.clock import TrackClock
from orchestrator.encode.lock import (
    MAX_PLAYLIST_ENTRIES,
    PTS_WRAP,
    FileLockError,
    LiveLock,
    choose_live_lock,
    content_offset_ns,
    file_entries,
    file_timing,
    live_clock_shift,
    pattern_box_x,
    position,
    tone_expression,
)

VIDEO = TrackClock(0, Fraction(2), 90000, Fraction(1001, 30000))
AUDIO = TrackClock(0, Fraction(2), 48000, Fraction(1024, 48000))


def probe(*, rate="30000/1001", real="30000/1001", packets="120", audio=True):
    streams: list[dict[str, object]] = [
        {"codec_type": "video", "avg_frame_rate": rate, "r_frame_rate": real, "nb_read_packets": packets}]  # fmt: skip
    if audio:
        streams.append({"codec_type": "audio", "sample_rate": "48000"})
    return {"streams": streams}


def test_the_loop_is_the_decoded_audio_length_when_there_is_audio():
    timing = file_timing(probe(), 192_224, needs_video=True, needs_audio=True)
    assert timing.loop == Fraction(192_224, 48000)
    assert (timing.video_frames, timing.frame_rate, timing.audio_samples) == (120, Fraction(30000, 1001), 192_224)
    silent = file_timing(probe(audio=False), None, needs_video=True, needs_audio=False)
    assert silent.loop == Fraction(120 * 1001, 30000)  # 4.004 s: frames / rate


@pytest.mark.parametrize(
    ("kwargs", "samples", "needs_audio", "reason"),
    [
        ({"audio": False}, None, True, "has no audio stream, and the profile has audio tracks"),
        ({"rate": "25/1", "real": "50/1"}, 100_000, True, "frame rate is not constant"),
        ({"packets": "0"}, 192_192, True, "frame count is unknown"),
        ({}, 0, True, "audio stream is empty"),
        ({}, 192_192 + 1602, True, "differ by more than one frame: the file cannot loop cleanly"),
    ],
)
def test_a_file_that_cannot_loop_cleanly_is_refused_with_the_reason(kwargs, samples, needs_audio, reason):
    with pytest.raises(FileLockError, match=reason):
        file_timing(probe(**kwargs), samples, needs_video=True, needs_audio=needs_audio)


def test_a_file_at_the_track_rate_shows_frame_n_mod_n_and_audio_sample_exact():
    loop = Fraction(120 * 1001, 30000)
    for n in (0, 1, 119, 120, 121, 10**9 + 7):
        assert position(VIDEO, n, loop) == (n % 120) * VIDEO.frame_duration
    audio_loop = Fraction(192_000, 48000)
    for n in (0, 187, 188, 10**8):
        assert position(AUDIO, n, audio_loop) * 48000 == (1024 * n) % 192_000


def test_the_playlist_opens_at_the_in_point_and_each_pass_starts_exactly_one_loop_later():
    loop, inpoint = Fraction(4004, 1000) + Fraction(1, 3 * 10**6), Fraction(1, 3)
    text = file_entries("/m/it's.mp4", inpoint, loop)
    lines = text.splitlines()
    assert lines[:6] == ["ffconcat version 1.0", "file '/m/it'\\''s.mp4'", "inpoint 0.333333", "duration 3.670667",
                         "file '/m/it'\\''s.mp4'", "duration 4.004000"]  # fmt: skip
    durations = [round(Fraction(line.split()[1]) * 10**6) for line in lines if line.startswith("duration")]
    assert len(durations) == min(MAX_PLAYLIST_ENTRIES, int(86400 // loop) + 2)
    # Rounded per entry but never accumulated: every pass starts within 0.5 us of k*L - inpoint.
    start = 0
    for k, d in enumerate(durations, start=1):
        start += d
        assert abs(start - (k * loop - inpoint) * 10**6) <= Fraction(1, 2)


def test_content_offset_is_the_same_whatever_the_frame_when_locked():
    loop = Fraction(4)
    assert {content_offset_ns(VIDEO, n, loop) for n in (0, 7, 120, 10**9)} == {0}
    assert content_offset_ns(VIDEO, 12345, None) == 0


def test_pattern_expressions_are_functions_of_the_shared_frame_and_sample():
    assert pattern_box_x(1000) == "(main_w-overlay_w)*abs(mod(n+40,120)-60)/60"  # 1000 mod 120
    # Shared sample 48000*5 + 12: on the pip (first 100 ms of the second), phase 12 samples in.
    assert tone_expression(48000 * 5 + 12, 48000, 1000) == (
        "0.5*sin(2*PI*1000*mod(n+12,48000)/48000)*lt(mod(n+12,48000),4800)")  # fmt: skip


# --- live ------------------------------------------------------------------------------------

NOW = 2_541_394_470_267  # a shared-clock tick (90 kHz) in late 2026


def test_a_new_live_lock_puts_the_newest_source_frame_at_now():
    lock = LiveLock.establish(pts=1_000_000, now_tick=NOW)
    assert lock.effective(1_000_000, NOW) == (NOW - 1_000_000, 0)
    assert 0 <= lock.offset < PTS_WRAP
    assert lock.effective(1_000_000, NOW)[0] % PTS_WRAP == lock.offset


def test_a_group_that_sees_the_frame_later_or_with_a_skewed_clock_maps_it_to_the_same_tick():
    lock = LiveLock.establish(pts=5_000, now_tick=NOW)
    # 0.35 s later (path delay + clock skew): same mapping, a residual of 0.35 s, still fitting.
    effective, residual = lock.effective(5_000, NOW + 31_500)
    assert 5_000 + effective == NOW
    assert residual == -31_500
    assert lock.fits(5_000, NOW + 31_500)


def test_the_33_bit_wrap_is_unwrapped_and_a_jump_is_a_discontinuity():
    lock = LiveLock.establish(pts=PTS_WRAP - 900, now_tick=NOW)  # 10 ms before the wrap
    # 1 s later the source's timestamps have wrapped to 89_100: the same timeline.
    effective, residual = lock.effective(89_100, NOW + 90_000)
    assert residual == 0
    assert 89_100 + effective == NOW + 90_000
    # A source restarted at 0 an hour of timestamps away is another timeline.
    assert not lock.fits(0, NOW + 90_000 * 3600)
    assert not lock.fits(PTS_WRAP // 2, NOW)


def test_a_peer_that_fits_wins_then_the_saved_mapping_then_a_new_one():
    peer, saved = LiveLock.establish(7, NOW), LiveLock.establish(7, NOW - 90_000 * 3)
    stale = LiveLock.establish(7, NOW - 90_000 * 3600)
    assert choose_live_lock(7, NOW + 9_000, [stale, peer], saved) == (peer, "peer")
    assert choose_live_lock(7, NOW, [stale], saved) == (saved, "saved")
    fresh, origin = choose_live_lock(7, NOW, [stale], None)
    assert (fresh, origin) == (LiveLock.establish(7, NOW), "established")
    with pytest.raises(ValueError, match="modulo 2"):
        LiveLock(PTS_WRAP)


def test_the_exported_content_offset_is_the_same_for_groups_on_one_lock():
    lock = LiveLock.establish(123_456, NOW)
    assert lock.content_offset_seconds() == ((123_456 - NOW) % PTS_WRAP) / 90000
    assert live_clock_shift(NOW - 123_456) == f"PTS+{NOW - 123_456}/90000/TB"
