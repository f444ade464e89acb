"""The monitor's decoder (orchestrator.ops.thumbnails) with the real ffmpeg, on real encoded content:
H.264 and AAC fragmented MP4 written by ffmpeg's own muxer (moving pictures, a still picture, black,
a tone, digital silence), split into init segment and fragments as an ingest receives them. The
rules (frozen, black, silent) are judged on what ffmpeg decodes, not on made-up grids."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from rig import wait_for

from orchestrator.ops.monitor import SILENT_DBFS, Key, ViewerLease
from orchestrator.ops.thumbnails import Thumbnailer

FFMPEG = shutil.which("ffmpeg")
pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg: apt-get install ffmpeg")

SOURCES = {
    "moving": ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25"],
    "still": ["-f", "lavfi", "-i", "smptebars=size=320x180:rate=25"],
    "black": ["-f", "lavfi", "-i", "color=c=black:size=320x180:rate=25"],
    "tone": ["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000"],
    "silence": ["-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo"],
}


def top_level_boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    boxes, at = [], 0
    while at < len(data):
        size, kind = struct.unpack_from(">I4s", data, at)
        boxes.append((kind, data[at : at + size]))
        at += size
    return boxes


def encode(tmp_path: Path, name: str, fragments: int = 3) -> tuple[bytes, list[bytes]]:
    """``fragments`` 2-second fragments of one track: (init segment, [moof + mdat, ...])."""
    out = tmp_path / f"{name}.mp4"
    codec = (["-c:a", "aac", "-b:a", "96k", "-frag_duration", "2000000"] if name in ("tone", "silence") else
             ["-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-keyint_min", "50", "-sc_threshold", "0",
              "-pix_fmt", "yuv420p"])  # fmt: skip
    subprocess.run([FFMPEG or "ffmpeg", "-v", "error", "-nostdin", *SOURCES[name], "-t", str(2 * fragments), *codec,
                    "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-y", str(out)],
                   check=True)  # fmt: skip
    boxes = top_level_boxes(out.read_bytes())
    init = b"".join(data for kind, data in boxes if kind in (b"ftyp", b"moov"))
    parts, current = [], b""
    for kind, data in boxes:
        if kind == b"moof":
            current = data
        elif kind == b"mdat":
            parts.append(current + data)
    return init, parts[:fragments]  # AAC's priming leaves a short last fragment behind the 3 whole ones


async def decode_all(thumbs: Thumbnailer, key: Key, kind: str, init: bytes, fragments: list[bytes]) -> list[list[str]]:
    """Offer each fragment and wait for its picture; the tile's marks after each."""
    thumbs.header(key, init, [kind])
    marks = []
    for index, fragment in enumerate(fragments):
        thumbs.watch()
        thumbs.offer(key, index, kind, fragment)
        await wait_for(lambda i=index: key in thumbs.pictures and thumbs.pictures[key][0].index == i, 30,
                       f"{key} fragment {index} decoded")  # fmt: skip
        marks.append(thumbs.pictures[key][1].marks())
    return marks


async def test_frozen_black_and_silent_on_real_encoded_content(tmp_path):
    thumbs = Thumbnailer(FFMPEG, fragment_seconds=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(thumbs.run)
        moving = await decode_all(thumbs, (("moving",), "g"), "video", *encode(tmp_path, "moving"))
        still = await decode_all(thumbs, (("still",), "g"), "video", *encode(tmp_path, "still"))
        black = await decode_all(thumbs, (("black",), "g"), "video", *encode(tmp_path, "black"))
        tone = await decode_all(thumbs, (("tone",), "g"), "audio", *encode(tmp_path, "tone"))
        silence = await decode_all(thumbs, (("silence",), "g"), "audio", *encode(tmp_path, "silence"))
        nursery.cancel_scope.cancel()
    assert moving == [[], [], []], "a moving picture is never frozen"
    assert still == [[], ["frozen"], ["frozen"]], "frozen from the second fragment with the same keyframe"
    assert black == [["black"], ["frozen", "black"], ["frozen", "black"]]
    assert tone == [[], [], []]
    assert silence == [["silent"]] * 3
    picture = thumbs.pictures[(("moving",), "g")][0]
    assert picture.png is not None
    assert picture.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert picture.luma is not None
    assert picture.luma > 60
    level = thumbs.pictures[(("tone",), "g")][0].level_dbfs
    assert level is not None
    assert -25 < level < -15, "lavfi's sine is 1/8 of full scale: -21 dBFS"
    silent = thumbs.pictures[(("silence",), "g")][0].level_dbfs
    assert silent is not None
    assert silent < SILENT_DBFS
    assert thumbs.counts.failed == thumbs.counts.timed_out == 0
    assert thumbs.counts.decoded == 15


async def test_nothing_is_kept_or_decoded_unless_watched_and_the_lease_lapses(tmp_path):
    init, fragments = encode(tmp_path, "moving", fragments=2)
    thumbs = Thumbnailer(FFMPEG, fragment_seconds=2.0, lease=ViewerLease(ttl=1.0))
    key: Key = (("moving",), "g")
    async with trio.open_nursery() as nursery:
        await nursery.start(thumbs.run)
        thumbs.header(key, init, ["video"])
        thumbs.offer(key, 0, "video", fragments[0])
        await trio.sleep(1.5)
        assert thumbs.shelf.size == 0
        assert thumbs.counts.decoded == 0
        assert not thumbs.pictures
        thumbs.watch()
        thumbs.offer(key, 1, "video", fragments[1])
        await wait_for(lambda: key in thumbs.pictures, 30, "decoded while watched")
        await wait_for(lambda: not thumbs.watching, 5, "the lease lapsed")
        assert (thumbs.pictures, thumbs.shelf.size) == ({}, 0), "what was kept is let go"
        nursery.cancel_scope.cancel()


async def test_a_fragment_ffmpeg_cannot_decode_is_counted_and_survived(tmp_path, caplog):
    init, fragments = encode(tmp_path, "moving", fragments=2)
    thumbs = Thumbnailer(FFMPEG, fragment_seconds=2.0)
    broken: Key = (("broken",), "g")
    good: Key = (("good",), "g")
    async with trio.open_nursery() as nursery:
        await nursery.start(thumbs.run)
        thumbs.watch()
        thumbs.header(broken, init, ["video"])
        thumbs.header(good, init, ["video"])
        # Offered together, so one ffmpeg gets both: the batch fails, and is decoded tile by tile.
        thumbs.offer(broken, 0, "video", b"\x00\x00\x00\x10moofgarbage!" + bytes(64))
        thumbs.offer(good, 0, "video", fragments[0])
        await wait_for(lambda: thumbs.counts.failed == 1 and good in thumbs.pictures, 30,
                       "the broken fragment failed, the good one beside it decoded")  # fmt: skip
        assert broken not in thumbs.pictures
        thumbs.offer(broken, 1, "video", fragments[1])
        await wait_for(lambda: broken in thumbs.pictures, 30, "the next good fragment decoded")
        nursery.cancel_scope.cancel()
    assert "monitor.decode.failed" in caplog.text
    assert thumbs.counts.failed == 1


async def test_a_decode_over_its_timeout_is_killed_and_counted(tmp_path):
    slow = tmp_path / "slow-ffmpeg"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    thumbs = Thumbnailer(str(slow), fragment_seconds=2.0, timeout=0.5)
    key: Key = (("slow",), "g")
    async with trio.open_nursery() as nursery:
        await nursery.start(thumbs.run)
        thumbs.watch()
        thumbs.header(key, b"init", ["video"])
        thumbs.offer(key, 0, "video", b"fragment")
        with trio.fail_after(10):
            await wait_for(lambda: thumbs.counts.timed_out == 1, 10, "the decode timed out")
        nursery.cancel_scope.cancel()
    assert not thumbs.pictures
