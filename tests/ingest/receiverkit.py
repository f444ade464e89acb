"""The receiver tests' kit: two track headers, a stream path, and the bodies a Smooth encoder
sends (the Live Server Manifest, the header, one-sample fragments, hostile truns), built with the
package's own writers; ``drain`` feeds a ``Post`` as the server does."""

from __future__ import annotations

import struct
from typing import Any

from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import NEED_DATA
from orchestrator.ingest.receiver import Decision, Post, PublishingPoint, StreamPath
from orchestrator.wire import smooth

AVC1 = boxes.box(b"avc1", bytes(78))
MP4A = boxes.box(b"mp4a", bytes(28))
VIDEO = boxes.TrackHeader(1, b"vide", 90000, AVC1, 192, 108)
AUDIO = boxes.TrackHeader(2, b"soun", 48000, MP4A)
PATH = StreamPath(("live", "demo"), "video")
FRAME = 3000  # ticks per video sample


def smil(names: dict[int, str], creator: str = "test") -> str:
    tracks = "".join(
        f'<video src="Streams(video)"><param name="trackID" value="{track_id}" valuetype="data"/>'
        f'<param name="trackName" value="{name}" valuetype="data"/></video>'
        for track_id, name in names.items()
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><smil xmlns="http://www.w3.org/2001/SMIL20/Language">'
        f'<head><meta name="creator" content="{creator}"/></head><body><switch>{tracks}</switch></body></smil>'
    )


def header(tracks: tuple[boxes.TrackHeader, ...] = (VIDEO,), manifest: str | None = None) -> bytes:
    manifest = smil({1: "video", 2: "audio"}) if manifest is None else manifest
    return smooth.write_ftyp() + smooth.write_live_server_manifest(manifest) + boxes.write_moov(tracks)


def run(index: int, track_id: int = 1, time: int | None = None, duration: int = FRAME) -> boxes.TrackRun:
    """Track ``track_id``'s part of fragment ``index``: one sample, time index * duration unless given."""
    samples = [boxes.Sample(bytes([track_id, index % 256]) * 8, duration)]
    return boxes.TrackRun(track_id, index * duration if time is None else time, samples, index)


def fragment(index: int, time: int | None = None, duration: int = FRAME, tfxd_version: int = 1) -> bytes:
    return smooth.write_fragment(index, [run(index, 1, time, duration)], tfxd_version)


def drain(post: Post, *chunks: bytes) -> list[Decision]:
    out = []
    for chunk in chunks:
        post.feed(chunk)
        while (decision := post.next_decision()) is not NEED_DATA:
            out.append(decision)
            if decision.outcome == "archived":
                post.written(decision)  # as the server does once the writes succeeded
    return out


def video(point: PublishingPoint) -> dict[str, Any]:
    return point.status()["publishing_points"]["live/demo"]["streams"]["video"]["tracks"]["1"]


def init(track: boxes.TrackHeader) -> bytes:
    return smooth.write_ftyp() + boxes.write_moov([track])


def traf_children(tfhd_flags: int, truns: list[bytes], track_id: int = 1, time: int = 0) -> bytes:
    tfhd = boxes.full_box(b"tfhd", 0, tfhd_flags, struct.pack(">I", track_id))
    tfxd = smooth.write_tfxd(smooth.Tfxd(1, time, FRAME))
    return boxes.box(b"traf", tfhd, *truns, tfxd)


def hostile_fragment(truns: list[bytes], payload: bytes, index: int = 0) -> bytes:
    """moof(mfhd, traf(tfhd default-base-is-moof, truns..., tfxd)) + mdat(payload). Each trun's
    data_offset is patched to point at the start of the mdat payload."""
    mfhd = boxes.full_box(b"mfhd", 0, 0, struct.pack(">I", index))

    def moof(data_offset: int) -> bytes:
        patched = [t[:16] + struct.pack(">i", data_offset) + t[20:] for t in truns]
        return boxes.box(b"moof", mfhd, traf_children(boxes.TFHD_DEFAULT_BASE_IS_MOOF, patched, time=index * FRAME))

    return moof(len(moof(0)) + 8) + boxes.box(b"mdat", payload)


def trun(count: int, size: int, duration: int = FRAME) -> bytes:
    """A trun of ``count`` samples of ``size`` bytes each (sizes given per sample), data offset 0."""
    flags = boxes.TRUN_DATA_OFFSET | boxes.TRUN_SAMPLE_DURATION | boxes.TRUN_SAMPLE_SIZE
    return boxes.full_box(b"trun", 0, flags, struct.pack(">Ii", count, 0), struct.pack(">II", duration, size) * count)
