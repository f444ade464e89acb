"""The relay's confidence monitor in a real browser: headless Chromium loads ``/monitor`` from a
real ``orchestrator relay`` process fed by ffmpeg's ismv push (the third-party encoder), with one
endpoint up (an ``orchestrator ingest`` process) and one unreachable; the test reads the DOM the
page's script drew (a tile per track, the video's picture, both endpoints' states) and saves
screenshots in its tmp_path. Track names come from the encoder's manifest: anyone who can push
chooses them, and the page shows them as text."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import httpx
import pytest
import trio
from browserkit import CHROMIUM, dump_dom, monitor_json, read_page, screenshot
from rig import IngestServer, Orchestrator, free_port, wait_for

from orchestrator.fmp4 import boxes
from orchestrator.testing.ismvpush import ismv_push_argv
from orchestrator.testing.profiles import endpoint, group, write_profile
from orchestrator.wire import smooth

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: apt-get install chromium (.ci/run installs it)"),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg: apt-get install ffmpeg"),
]

STREAM = "video"


def relay_profile(path: Path, *, listen: int, metrics: int, ports: list[int]) -> Path:
    endpoints = [endpoint(port, name=f"ingest-{chr(97 + i)}", region=f"region-{chr(97 + i)}")
                 for i, port in enumerate(ports)]  # fmt: skip
    return write_profile(
        path, name="relay", streams={STREAM: [{"kind": "video", "name": "video", "bitrate": 300_000,
                                               "width": 320, "height": 180, "frame_rate": 25}]},
        groups={"primary": group(*endpoints, encoder={"backend": "relay", "listen": f"127.0.0.1:{listen}"}),
                "backup": group(endpoint(ports[0]))},
        metrics={"enabled": True, "listen": f"127.0.0.1:{metrics}"})  # fmt: skip


async def relay_process(tmp_path: Path, orchestrators: Callable[..., Orchestrator],
                        ports: list[int]) -> tuple[Orchestrator, int, str]:  # fmt: skip
    """A relay process; returns it, its encoder port and its metrics listener's base URL."""
    listen, metrics = free_port(), free_port()
    profile = relay_profile(tmp_path / "relay.toml", listen=listen, metrics=metrics, ports=ports)
    relay = orchestrators("relay", str(profile), "--status", "log", log="relay.log")
    await wait_for(lambda: "relay.started" in relay.text(), 30, "relay.started in relay.log")
    return relay, listen, f"http://127.0.0.1:{metrics}"


def row_tiles(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["track"]: tile for row in document["rows"] if row["stream"] == STREAM for tile in row["tiles"]}


async def test_the_relay_page_shows_each_tracks_picture_and_each_endpoints_state(
    tmp_path: Path, ingest_server: Callable[..., IngestServer], orchestrators: Callable[..., Orchestrator]
) -> None:
    server = ingest_server("ingest-a")
    relay, listen, base = await relay_process(tmp_path, orchestrators, [server.port, free_port()])
    argv = ismv_push_argv(f"http://127.0.0.1:{listen}/live/relay.isml/Streams({STREAM})", 60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False))
        found: dict[str, Any] = {}

        async def pictured() -> bool:  # a poll, as the page makes: it holds the viewer lease
            found["doc"] = document = await monitor_json(base)
            tiles = row_tiles(document)
            video, audio = tiles.get("video"), tiles.get("audio")
            return bool(video and audio and video["picture"] and video["picture"]["url"] and audio["picture"]
                        and audio["picture"]["level_dbfs"] is not None)  # fmt: skip

        await wait_for(pictured, 60, "the video's picture and the audio's level on the relay's monitor")
        page = read_page(await dump_dom(f"{base}/monitor"))
        await screenshot(f"{base}/monitor", tmp_path / "relay-monitor.png")

        assert set(page.rows) == {(STREAM, "video"), (STREAM, "audio")}
        assert page.rows[(STREAM, "video")]["differs"] == "no"
        for track in ("video", "audio"):
            tile = page.tile(STREAM, "primary", track=track)
            assert tile.index.isdigit(), f"{track}: a decoded fragment"
            assert "last #" in tile.text, tile.text
            assert "ingest-a (region-a) streaming" in tile.text, tile.text
            assert "ingest-b (region-b) reconnecting" in tile.text, tile.text
            assert "ingest-b last error" in tile.text, tile.text
            assert "forwarded" in tile.text
            assert " ".join(tile.marks) == "endpoint down", "ingest-b fails while ingest-a streams (data-marks)"
        assert "Relay monitor · relay" in await dump_dom(f"{base}/monitor")
        video = page.tile(STREAM, "primary", track="video")
        assert video.img is not None
        assert video.img.startswith("/monitor/thumb?")
        async with httpx.AsyncClient(timeout=10) as client:
            thumb = await client.get(f"{base}{video.img}")
        assert thumb.status_code == 200
        assert thumb.content.startswith(b"\x89PNG")
        assert "dBFS" in page.tile(STREAM, "primary", track="audio").text
        nursery.cancel_scope.cancel()
    assert relay.stop() == 0


async def test_the_encoders_track_names_are_shown_as_text_never_as_markup(
    tmp_path: Path, orchestrators: Callable[..., Orchestrator]
) -> None:
    hostile = '<img src="x" onerror="document.title=1"><b>bold</b>'
    relay, listen, base = await relay_process(tmp_path, orchestrators, [free_port(), free_port()])
    track = boxes.TrackHeader(1, b"vide", 10_000_000, boxes.box(b"avc1", bytes(78)), 192, 108)
    smil = ('<?xml version="1.0" encoding="utf-8"?><smil xmlns="http://www.w3.org/2001/SMIL20/Language"><body>'
            '<switch><video src="Streams(video)"><param name="trackID" value="1" valuetype="data"/>'
            f"<param name=\"trackName\" value={quoteattr(hostile)} valuetype=\"data\"/>"
            "</video></switch></body></smil>")  # fmt: skip
    body = smooth.write_ftyp() + smooth.write_live_server_manifest(smil) + boxes.write_moov([track]) + b"".join(
        smooth.write_fragment(k + 1, [boxes.TrackRun(1, k * 20_000_000, [boxes.Sample(b"\0" * 16, 20_000_000)], k)])
        for k in range(3))  # fmt: skip
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"http://127.0.0.1:{listen}/live/relay.isml/Streams({STREAM})", content=body)
    assert answer.status_code == 200
    html = await dump_dom(f"{base}/monitor")
    page = read_page(html)
    [tile] = page.tiles
    assert tile.track == hostile
    assert '<img src="x"' not in html
    assert "<b>bold</b>" not in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html
    assert relay.stop() == 0
