"""Track kinds as data, and the one adapter from the profile to the wire formats' track descriptions."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import tracks
from orchestrator.profile import load_profile
from orchestrator.tracks import AUDIO, SPARSE, VIDEO, TrackDescription

DEMO = Path(__file__).parent.parent / "profiles" / "demo.toml"


def test_the_kinds_are_values():
    assert [(k.name, k.handler, k.manifest_type, k.continuous) for k in tracks.KINDS.values()] == [
        ("video", b"vide", "video", True),
        ("audio", b"soun", "audio", True),
        ("sparse", b"meta", "text", False),
    ]


@pytest.mark.parametrize(
    ("handler", "kind", "continuous"),
    [(b"vide", VIDEO, True), (b"soun", AUDIO, True), (b"meta", SPARSE, False), (b"hint", None, True)],
)
def test_a_handler_names_its_kind_and_an_unknown_one_stays_continuous(handler, kind, continuous):
    assert tracks.kind_of_handler(handler) is kind
    assert tracks.is_continuous(handler) is continuous


def test_the_profile_describes_its_tracks_for_the_wire_formats():
    profile = load_profile(DEMO, now_ns=1_800_000_000 * 10**9)
    video_stream, audio_stream = profile.streams
    assert [t.track_kind for t in video_stream.tracks + audio_stream.tracks] == [VIDEO, AUDIO]
    (video,) = profile.describe(video_stream, [b"\0\0\0\x08avc1"])
    (audio,) = profile.describe(audio_stream, [b"\0\0\0\x08mp4a"])
    # profiles/demo.toml: 640x360 at 800 kb/s, the presentation's 90 kHz; AAC at 128 kb/s, 48 kHz stereo.
    assert video == TrackDescription(1, "video_360p", VIDEO, 90000, 800_000, b"\0\0\0\x08avc1", width=640, height=360)
    assert audio == TrackDescription(2, "audio_eng", AUDIO, 48000, 128_000, b"\0\0\0\x08mp4a", language="eng",
                                     sample_rate=48000, channels=2)  # fmt: skip
    assert (video.codec, audio.codec) == ("avc1", "mp4a")
    with pytest.raises(ValueError, match="one sample entry per track"):
        profile.describe(video_stream, [])
