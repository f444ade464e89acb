"""The relay tests' kit: what a Smooth encoder sends (a two-track header, one-track fragments with
any tfxd time, ffmpeg's way of numbering mfhd across tracks), built with the package's writers,
and ``events`` to feed an EncoderPost as the relay's server does."""

from __future__ import annotations

from fractions import Fraction

from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import NEED_DATA
from orchestrator.relay.intake import EncoderPost, Event, StreamTimeline
from orchestrator.wire import smooth

TIMESCALE = 10_000_000  # what ffmpeg's ismv muxer writes for both tracks
AVC1 = boxes.box(b"avc1", bytes(78))
MP4A = boxes.box(b"mp4a", bytes(28))
VIDEO = boxes.TrackHeader(1, b"vide", TIMESCALE, AVC1, 192, 108)
AUDIO = boxes.TrackHeader(2, b"soun", TIMESCALE, MP4A)
SECOND = TIMESCALE
FRAGMENT = 2 * SECOND
DURATION = Fraction(2)  # the profile's fragment duration
PRIMING = 213_333  # ffmpeg's AAC priming in 10 MHz ticks: its first audio fragment starts at -213,333


def smil(creator: str = "test") -> str:
    tracks = "".join(
        f'<{kind} src="Streams(video)"><param name="trackID" value="{track_id}" valuetype="data"/>'
        f'<param name="trackName" value="{kind}" valuetype="data"/></{kind}>'
        for track_id, kind in ((1, "video"), (2, "audio"))
    )
    head = f'<head><meta name="creator" content="{creator}"/></head>'
    return ('<?xml version="1.0" encoding="utf-8"?><smil xmlns="http://www.w3.org/2001/SMIL20/Language">'
            f"{head}<body><switch>{tracks}</switch></body></smil>")  # fmt: skip


def header(creator: str = "test") -> bytes:
    return smooth.write_ftyp() + smooth.write_live_server_manifest(smil(creator)) + boxes.write_moov([VIDEO, AUDIO])


def unsigned(time: int) -> int:
    """A signed time as a 64-bit tfxd field holds it (-213,333 is 2^64 - 213,333)."""
    return time % (1 << 64)


def fragment(track_id: int, time: int, *, mfhd: int = 1, duration: int = FRAGMENT, samples: int = 4,
             tfxd_version: int = 1, sample_bytes: int = 16) -> bytes:  # fmt: skip
    """One track's fragment at signed ``time``: ``samples`` samples of ``sample_bytes`` over ``duration`` ticks."""
    each = duration // samples
    data = bytes([track_id, mfhd % 256]) * (sample_bytes // 2)
    run = boxes.TrackRun(track_id, unsigned(time), [boxes.Sample(data, each)] * samples, mfhd)
    return smooth.write_fragment(mfhd, [run], tfxd_version)


def two_track_fragment(time: int, mfhd: int = 1) -> bytes:
    runs = [boxes.TrackRun(t, time, [boxes.Sample(bytes([t]) * 8, FRAGMENT)], mfhd) for t in (1, 2)]
    return smooth.write_fragment(mfhd, runs)


def ffmpeg_body(count: int, *, first: int = 0, sample_bytes: int = 16) -> list[bytes]:
    """Fragments ``first`` .. ``first + count - 1`` of both tracks as ffmpeg's ismv push sends them:
    video at k x 2 s, audio at k x 2 s - PRIMING, mfhd counting moofs of both tracks (video 1, 3,
    5 ...; audio 2, 4, 6 ...)."""
    out = []
    for k in range(first, first + count):
        out.append(fragment(1, k * FRAGMENT, mfhd=2 * k + 1, sample_bytes=sample_bytes))
        out.append(fragment(2, k * FRAGMENT - PRIMING, mfhd=2 * k + 2, sample_bytes=sample_bytes))
    return out


def events(post: EncoderPost, *chunks: bytes) -> list[Event]:
    out: list[Event] = []
    for chunk in chunks:
        post.feed(chunk)
        while (event := post.next_event()) is not NEED_DATA:
            out.append(event)
    return out


def new_post(timeline: StreamTimeline | None = None) -> EncoderPost:
    return EncoderPost(timeline or StreamTimeline("video"), DURATION)
