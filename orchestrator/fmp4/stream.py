"""What an encoder instance hands to the publishers: a stream header and per-track fragments.

Theory of operation
-------------------
Every encoder backend (synthetic now, ffmpeg later) produces, for one stream, one
:class:`StreamHeader` (the exact ``ftyp`` + Live Server Manifest + ``moov`` bytes that open every
POST) and then, for each shared-clock fragment index k, one :class:`EncodedFragment` per track
(a ``moof`` + ``mdat`` carrying that track only, as Smooth ingest encoders send them).

:func:`build_header` derives the header from the profile alone plus the codec configuration
(sample entries), so two groups that encode the same presentation emit byte-identical headers,
as spec sections 7.5.c and 8.3 require.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.fmp4 import boxes
from orchestrator.fmp4.manifest import ManifestTrack, live_server_manifest
from orchestrator.profile import AudioTrack, Profile, Stream, VideoTrack


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


def build_header(profile: Profile, stream: Stream, sample_entries: Sequence[bytes]) -> StreamHeader:
    """The header of ``stream``, given one sample entry box per track (in profile order)."""
    if len(sample_entries) != len(stream.tracks):
        raise ValueError("one sample entry per track is needed")
    headers: list[boxes.TrackHeader] = []
    manifest_tracks: list[ManifestTrack] = []
    for track_id, track, entry in zip(profile.track_ids(stream), stream.tracks, sample_entries, strict=True):
        timescale = profile.track_clock(track).timescale
        codec = entry[4:8].decode("latin-1")
        if isinstance(track, VideoTrack):
            headers.append(boxes.TrackHeader(track_id, b"vide", timescale, entry, track.width, track.height))
            manifest_tracks.append(ManifestTrack("video", track_id, track.name, track.bitrate, timescale, codec,
                                                 width=track.width, height=track.height))  # fmt: skip
        else:
            assert isinstance(track, AudioTrack)
            headers.append(boxes.TrackHeader(track_id, b"soun", timescale, entry, language=track.language))
            manifest_tracks.append(ManifestTrack("audio", track_id, track.name, track.bitrate, timescale, codec,
                                                 language=track.language, sample_rate=track.sample_rate,
                                                 channels=track.channels))  # fmt: skip
    smil = live_server_manifest(manifest_tracks)
    data = boxes.write_ftyp() + boxes.write_live_server_manifest(smil) + boxes.write_moov(headers)
    return StreamHeader(stream.id, tuple(headers), data)
