"""The content lock's arithmetic: file loop timing, the ffconcat list, positions, expressions."""

from __future__ import annotations

from fractions import Fraction

import pytest

from orchestrator.clock import TrackClock
from orchestrator.encode.lock import (
    MAX_PLAYLIST_ENTRIES,
    FileLockError,
    content_offset_ns,
    file_entries,
    file_timing,
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
