"""Shared fixtures: the packaged ffmpeg clips, read once per session. Plugins: ``ci_skips`` (under
``CI=true`` a skipped test fails the run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.fmp4.boxes import Sample, TrackHeader
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, StreamReader

pytest_plugins = ["ci_skips"]

MEDIA = Path(__file__).resolve().parent.parent / "orchestrator" / "encode" / "media"

Clip = tuple[TrackHeader, tuple[Sample, ...]]
"""The one track of a packaged clip: its header as ffmpeg wrote it, and its samples."""


def read_clip(name: str) -> Clip:
    reader = StreamReader()
    reader.feed((MEDIA / name).read_bytes())
    header: Header | None = None
    samples: list[Sample] = []
    while (event := reader.next_event()) is not NEED_DATA:
        if isinstance(event, Header):
            header = event
        elif isinstance(event, Fragment):
            samples.extend(s for traf in event.parsed.trafs for s in traf.samples)
    assert header is not None
    assert len(header.tracks) == 1
    return header.tracks[0], tuple(samples)


@pytest.fixture(scope="session")
def video_clip() -> Clip:
    """``video.mp4``: 50 intra-only H.264 frames, 192x108."""
    return read_clip("video.mp4")


@pytest.fixture(scope="session")
def audio_clip() -> Clip:
    """``audio_48000_2.mp4``: one second of stereo AAC-LC at 48 kHz."""
    return read_clip("audio_48000_2.mp4")
