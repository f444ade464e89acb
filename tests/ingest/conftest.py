"""Fixtures of the ingest tests: ``media`` (the packaged clip as a one-track stream) and
``server`` (an ingest server on a free loopback port, in the test's nursery)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from ingestkit import FRAGMENTS, FRAME, FRAMES_PER_FRAGMENT, Media, Server

from orchestrator.encode.synthetic import load_clip
from orchestrator.fmp4 import boxes
from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.wire import smooth
from orchestrator.wire.smooth import ManifestTrack, live_server_manifest


@pytest.fixture(scope="module")
def media() -> Media:
    clip = load_clip("video.mp4")
    track = boxes.TrackHeader(1, b"vide", 90000, clip.sample_entry, 192, 108)
    smil = live_server_manifest([ManifestTrack("video", 1, "video", 200_000, 90000, "avc1", width=192, height=108)])
    header = smooth.write_ftyp() + smooth.write_live_server_manifest(smil) + boxes.write_moov([track])
    fragments = []
    for k in range(FRAGMENTS):
        frames = clip.samples[k * FRAMES_PER_FRAGMENT : (k + 1) * FRAMES_PER_FRAGMENT]
        samples = [boxes.Sample(data, FRAME, is_sync=True) for data in frames]
        run = boxes.TrackRun(1, k * FRAMES_PER_FRAGMENT * FRAME, samples, k)
        fragments.append(smooth.write_fragment(k, [run], tfxd_version=2))
    return Media(track, header, tuple(fragments))


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    app = IngestApp(tmp_path / "archive")
    host, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
    return Server(app, f"http://{host}:{port}", tmp_path / "archive")
