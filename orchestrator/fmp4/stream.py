"""What an encoder hands to the publishers: a stream header and per-track fragments.

Theory of operation
-------------------
Every encoder backend (synthetic and ffmpeg; a relay later) produces, for one stream, one
:class:`StreamHeader` (the exact bytes that open every request: for Smooth ``ftyp`` + Live
Server Manifest + ``moov``) and then, for each shared-clock fragment index k, one
:class:`EncodedFragment` per track that has one (a ``moof`` + ``mdat`` carrying that track
only). A continuous track (video, audio) has a fragment for every k; a sparse one only now and
then, and its fragments say so (``continuous``), so that no consumer waits for them.

These are plain data, the same for every wire format: the bytes are written by the format
(:mod:`orchestrator.wire`; Smooth's header comes from :func:`orchestrator.wire.smooth.build_header`),
and the push side carries them without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.fmp4 import boxes


@dataclass(frozen=True)
class StreamHeader:
    stream_id: str
    tracks: tuple[boxes.TrackHeader, ...]
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class EncodedFragment:
    """Fragment ``index`` of one track, ready for the wire."""

    stream_id: str
    track_id: int
    index: int
    start: int  # ticks since the epoch, in the track's timescale
    duration: int  # ticks
    timescale: int
    data: bytes = field(repr=False)
    continuous: bool = True  # the track's kind has a fragment for every index (TrackKind.continuous)
