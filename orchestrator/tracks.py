"""Track kinds and track descriptions: plain data that every layer shares.

Theory of operation
-------------------
A track's *kind* is a value, not a branch: :class:`TrackKind` says what a kind is called, the
ISO BMFF handler its ``moov`` declares (``hdlr``, ISO/IEC 14496-12 8.4.3), the element that names
it in a manifest, and whether it is *continuous*: whether the track has a fragment for every
shared-clock index k. Video and audio are continuous; a sparse track (metadata, SCTE-35 cues)
has a fragment only when there is something to say, so nothing may wait for its fragment k:
the continuity gate, the outbox's bounds and resends, the receiver's gap count and the shells'
idle and finish rules ask ``kind.continuous`` instead of assuming it.

:class:`TrackDescription` is what a wire format needs to know about one track to write a
stream header: it is built from the pydantic profile by :meth:`orchestrator.profile.Profile.describe`,
and a relay, which has no profile, builds it from what an encoder sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TrackKind:
    """What one kind of track is: its name, the ``hdlr`` handler type of its ``trak``, the element
    a manifest lists it under, and whether it has a fragment for every shared-clock index k."""

    name: str
    handler: bytes  # ISO/IEC 14496-12, 8.4.3: hdlr handler_type
    manifest_type: Literal["video", "audio", "text"]
    continuous: bool


VIDEO = TrackKind("video", b"vide", "video", continuous=True)
AUDIO = TrackKind("audio", b"soun", "audio", continuous=True)
SPARSE = TrackKind("sparse", b"meta", "text", continuous=False)
"""Metadata / SCTE-35: a fragment only when there is an event. Not a profile track type yet."""

KINDS: dict[str, TrackKind] = {kind.name: kind for kind in (VIDEO, AUDIO, SPARSE)}


def kind_of_handler(handler: bytes) -> TrackKind | None:
    """The kind whose ``trak`` declares ``handler``, or None for a handler no kind uses."""
    for kind in KINDS.values():
        if kind.handler == handler:
            return kind
    return None


def is_continuous(handler: bytes) -> bool:
    """Whether a track with ``handler`` has a fragment for every index k. A handler no kind uses
    counts as continuous: what was true of every track before kinds were data stays true."""
    kind = kind_of_handler(handler)
    return kind is None or kind.continuous


@dataclass(frozen=True)
class TrackDescription:
    """One track as a wire format sees it, independent of where it came from.

    ``sample_entry`` is the complete sample entry box (``avc1``, ``mp4a``, ...) for ``stsd``.
    Video sets width and height; audio sets language, sample rate and channels.
    """

    track_id: int
    name: str
    kind: TrackKind
    timescale: int
    bitrate: int
    sample_entry: bytes = field(repr=False)
    width: int = 0
    height: int = 0
    language: str = "und"
    sample_rate: int = 0
    channels: int = 0

    @property
    def codec(self) -> str:
        """The sample entry type: ``avc1``, ``mp4a`` ..."""
        return self.sample_entry[4:8].decode("latin-1")
