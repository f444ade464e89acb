"""A real third-party encoder into ``orchestrator ingest`` (issue 20): ffmpeg 5.1 pushing its
``ismv`` output over HTTP, the archive read back with ffprobe.

ffmpeg sends a plain Smooth ingest POST: ftyp, Live Server Manifest, moov, then one moof + mdat
per track and keyframe (tfxd v1, no tfdt), one chunked POST, no empty probe first,
``Connection: close``, mfhd numbered across both tracks, and its first AAC fragment stamped
-213,333 (the encoder's priming). The same ffmpeg command writing to a file is the reference:
its output is deterministic (two runs are byte-identical), so each archived track must hold
exactly the packets ffprobe finds in the reference's track: same count, times, durations, sizes.

Before issue 20 the audio kept 2.0 s of 8 s here (every fragment after the primed one rejected)
and the video reported 3 gaps that were not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import trio
from ingestkit import Server

from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, StreamReader
from orchestrator.wire import smooth

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                       reason="needs ffmpeg and ffprobe: apt-get install ffmpeg (see README)"),
]  # fmt: skip

STREAM = "/live/pp.isml/Streams(v)"
SECONDS = 6


def ffmpeg(output: str, *, realtime: bool = False, video_bitrate: str | None = None) -> list[str]:
    """ffmpeg's Smooth push of ``SECONDS`` s of H.264 + AAC, 2 s fragments, to ``output``."""
    return ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", *(["-re"] if realtime else []),
            "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", str(SECONDS), "-c:v", "libx264", "-g", "50", *(["-b:v", video_bitrate] if video_bitrate else []),
            "-c:a", "aac", "-movflags", "isml+frag_keyframe", "-f", "ismv", "-y", output]  # fmt: skip


async def packets(path: Path, stream: int = 0) -> list[tuple[str, str, str, str, str]]:
    """(pts, dts, duration, size, flags) of every packet of one stream, as ffprobe reads the file
    (the first AAC packet has no duration: it is the encoder's priming, ffprobe skips it)."""
    done = await trio.run_process(
        ["ffprobe", "-v", "error", "-select_streams", str(stream), "-show_entries",
         "packet=pts,dts,duration,size,flags", "-of", "json", str(path)],
        capture_stdout=True, capture_stderr=True)  # fmt: skip
    found = json.loads(done.stdout)["packets"]
    return [(p["pts"], p["dts"], p.get("duration", "-"), p["size"], p["flags"]) for p in found]


async def reference(tmp_path: Path, **options: str) -> tuple[Path, list[list[tuple[str, str, str, str, str]]]]:
    """The same encode written to a file: the file, and its video and audio packets."""
    path = tmp_path / f"reference-{len(list(tmp_path.glob('reference-*')))}.ismv"
    await trio.run_process(ffmpeg(str(path), **options), capture_stderr=True)  # type: ignore[arg-type]
    return path, [await packets(path, 0), await packets(path, 1)]


def split(data: bytes) -> tuple[bytes, list[bytes]]:
    """An ismv file's header and its fragments (moof + mdat), as ffmpeg pushes them."""
    reader = StreamReader(manifest=smooth.RECEIVER.manifest, require_manifest=True)
    reader.feed(data)
    head, fragments = b"", []
    while (event := reader.next_event()) is not NEED_DATA:
        if isinstance(event, Header):
            head = event.data
        elif isinstance(event, Fragment):
            fragments.append(event.data)
    return head, fragments


def tracks(server: Server) -> dict[str, dict[str, int]]:
    status = server.app.point.status()
    return status["publishing_points"]["live/pp"]["streams"]["v"]["tracks"]  # type: ignore[no-any-return]


async def test_ffmpeg_ismv_push_archives_both_tracks_whole(server: Server, tmp_path: Path) -> None:
    _, (video, audio) = await reference(tmp_path)
    # 6 s at 25 fps; 6 s of 1,024-sample AAC frames and the priming one
    assert (len(video), len(audio)) == (25 * SECONDS, 283)
    with trio.fail_after(60):
        await trio.run_process(ffmpeg(server.url + STREAM, realtime=True), capture_stderr=True)
    archive = server.archive / "live" / "pp" / "v"
    assert await packets(archive / "video.mp4") == video
    assert await packets(archive / "audio.mp4") == audio
    assert {key: (t["fragments_archived"], t["rejected"], t["gaps"], t["negative_times"])
            for key, t in tracks(server).items()} == {"1": (3, 0, 0, 0), "2": (3, 0, 0, 1)}  # fmt: skip
    status = server.app.point.status(posts=True)
    assert (status["probes"], status["post_log"][0]["status"]) == (0, "ok")  # no probe; one POST, ended cleanly


async def test_an_encoder_that_reconnects_and_resends_loses_nothing_and_doubles_nothing(
    server: Server, tmp_path: Path
) -> None:
    """ffmpeg's own bytes, sent as a reconnecting encoder would: the first POST is cut after two
    fragments per track (the connection closed mid-stream), the second resends the last two
    before going on. Both tracks archive exactly the reference's packets; the two resent
    fragments are dropped and counted."""
    path, (video, audio) = await reference(tmp_path)
    head, fragments = split(path.read_bytes())
    assert len(fragments) == 6
    async with httpx.AsyncClient(base_url=server.url, headers={"connection": "close"}) as client:

        async def body(*parts: bytes):  # a chunked body, as ffmpeg sends it
            for part in parts:
                yield part

        first = await client.post(STREAM, content=body(head, *fragments[:4]))
        second = await client.post(STREAM, content=body(head, *fragments[2:]))
    assert (first.status_code, second.status_code) == (200, 200)
    archive = server.archive / "live" / "pp" / "v"
    assert await packets(archive / "video.mp4") == video
    assert await packets(archive / "audio.mp4") == audio
    assert {key: (t["fragments_archived"], t["duplicates_dropped"], t["conflicts"], t["gaps"])
            for key, t in tracks(server).items()} == {"1": (3, 1, 0, 0), "2": (3, 1, 0, 0)}  # fmt: skip
    assert server.app.point.status(posts=True)["post_log"][1]["outcomes"] == {"archived": 2, "duplicate": 2}


async def test_an_encoder_restarted_with_a_new_header_archives_both_runs(server: Server, tmp_path: Path) -> None:
    """ffmpeg pushes, stops, and is started again with another bitrate: a new header, and its
    time starts over at zero. The second run goes to new files (``-2``), whole; the first run's
    files are untouched."""
    _, first = await reference(tmp_path)
    _, second = await reference(tmp_path, video_bitrate="300k")
    with trio.fail_after(60):
        await trio.run_process(ffmpeg(server.url + STREAM), capture_stderr=True)
        await trio.run_process(ffmpeg(server.url + STREAM, video_bitrate="300k"), capture_stderr=True)
    archive = server.archive / "live" / "pp" / "v"
    assert [await packets(archive / "video.mp4"), await packets(archive / "audio.mp4")] == first
    assert [await packets(archive / "video-2.mp4"), await packets(archive / "audio-2.mp4")] == second
    stream = server.app.point.status()["publishing_points"]["live/pp"]["streams"]["v"]
    assert (stream["posts"], stream["restarts"], stream["header_mismatches"]) == (2, 1, 1)
    files = {t["file"].rsplit("/")[-1]: (t["fragments_archived"], t["duplicates_dropped"])
             for t in stream["tracks"].values()}  # fmt: skip
    assert files == {"video.mp4": (3, 0), "audio.mp4": (3, 0), "video-2.mp4": (3, 0), "audio-2.mp4": (3, 0)}
