"""The wire-format seam: what one ingest protocol (Smooth today, CMAF ingest next) must provide.

Theory of operation
-------------------
Everything that is ISO BMFF is shared (:mod:`orchestrator.fmp4`); what differs between ingest
protocols is small, and a format says it through :class:`WireFormat`:

* **the stream header** for a set of tracks (:class:`~orchestrator.tracks.TrackDescription`,
  plain data: built from the profile by :meth:`orchestrator.profile.Profile.describe`, or by a
  relay from what an encoder sent), as the exact bytes that open a request;
* **a fragment's boxes** from encoded samples: :meth:`WireFormat.fragment` writes them,
  :meth:`WireFormat.fragment_template` gives the cheap patched copy the synthetic encoder uses;
  both build on :func:`orchestrator.fmp4.boxes.write_movie_fragment` with the format's traf tail;
* **the request plan** (:class:`RequestPlan`): one long-running request per stream or one per
  segment, whether an empty probe precedes it, whether each request repeats the header, and the
  URL of each request;
* **what a receiver checks** (:class:`ReceiverRules`): the manifest box the header must carry,
  the track names it gives, where a fragment's index and time are read, which ``traf`` is not
  acceptable, and how the archive writes one track. The receiver
  (:mod:`orchestrator.ingest.receiver`) is otherwise the same for every format.

Adding a format is one module that implements these, plus its tests
(``tests/wire/test_format_seam.py`` plugs a skeleton per-segment format in). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from orchestrator.fmp4.boxes import MovieFragmentTemplate, ParsedFragment, ParsedTraf, Sample, TrackHeader, TrackRun
from orchestrator.fmp4.reader import Header, ManifestBox
from orchestrator.fmp4.stream import StreamHeader
from orchestrator.tracks import TrackDescription, TrackKind

__all__ = ["FragmentTiming", "ReceiverRules", "RequestPlan", "TrackDescription", "TrackKind", "WireFormat"]


@dataclass(frozen=True)
class RequestPlan:
    """How a stream travels over HTTP.

    ``per``: ``"stream"`` (one long-running chunked POST per stream and endpoint, fragments
    appended as they come) or ``"segment"`` (one request per fragment of one track).
    ``probe_first``: an empty-body POST, sent with ``Connection: close``, precedes each request.
    ``header_on_every_request``: each request body opens with the stream header.
    ``path``: appended to the endpoint's base URL; ``{stream}``, and for a per-segment plan
    ``{track}`` (a track name) and optionally ``{index}`` (the fragment index), are filled in.
    ``header_alone``: the header travels as a request of its own (CMAF ingest: a track's CMAF
    header is POSTed before its first segment and again after any failure), never before a
    fragment in the same body.
    """

    per: Literal["stream", "segment"]
    probe_first: bool
    header_on_every_request: bool
    path: str
    header_alone: bool = False

    def __post_init__(self) -> None:
        if self.per not in ("stream", "segment"):
            raise ValueError(f"a request plan is per stream or per segment, not {self.per!r}")
        if "{stream}" not in self.path:
            raise ValueError(f"request path {self.path!r} does not name the stream ({{stream}})")
        per_track = "{track}" in self.path or "{index}" in self.path
        if self.per == "stream" and per_track:
            raise ValueError("a per-stream request plan has one URL per stream: no {track} or {index}")
        if self.per == "segment" and "{track}" not in self.path:
            raise ValueError("a per-segment request plan needs {track} in its path")
        if self.header_alone and (self.per != "segment" or self.header_on_every_request):
            raise ValueError("a header alone on its request goes with one request per segment, sent once a session")

    def url(self, base: str, stream_id: str, track: str | None = None, index: int | None = None) -> str:
        """The URL of a request for ``stream_id`` (and, per segment, ``track``'s fragment
        ``index``) at the endpoint ``base`` (no trailing slash)."""
        if self.per == "stream":
            if track is not None or index is not None:
                raise ValueError("a per-stream request plan has one URL per stream; give no track or index")
            return base + self.path.format(stream=stream_id)
        if track is None or ("{index}" in self.path and index is None):
            raise ValueError("a per-segment request URL needs the track" + (" and index" if "{index}" in self.path
                                                                            else ""))  # fmt: skip
        return base + self.path.format(stream=stream_id, track=track, index=index)


@dataclass(frozen=True)
class FragmentTiming:
    """Where one ``traf`` sits on its track's timeline, as the format reads it."""

    index: int  # the shared fragment index
    time: int | None  # the fragment's start in track ticks; None if the traf does not say
    duration: int  # in track ticks


class ReceiverRules(Protocol):
    """The checks and choices of a receiver that depend on the wire format. The receiver calls
    them for every POST (:class:`orchestrator.ingest.receiver.PostChecker`) and for the archive."""

    @property
    def manifest(self) -> ManifestBox | None:
        """The manifest box the header carries, if the format has one."""
        ...

    @property
    def require_manifest(self) -> bool:
        """Whether a header without the manifest box (or with it after ``moov``) ends the request."""
        ...

    def track_names(self, header: Header) -> dict[int, str]:
        """track ID -> track name, as the header says (raises MediaError for a hostile manifest)."""
        ...

    def timing(self, traf: ParsedTraf, sequence_number: int) -> FragmentTiming:
        """Index, time and duration of ``traf`` in a fragment with ``sequence_number``. Raises
        BoxError if the format's boxes in it are malformed."""
        ...

    def problem(self, traf: ParsedTraf) -> str | None:
        """Why ``traf`` is not acceptable (the fragment is rejected, the request goes on); None if it is."""
        ...

    def init_segment(self, track: TrackHeader) -> bytes:
        """The init segment of an archive file holding ``track`` alone."""
        ...

    def single_track_fragment(self, parsed: ParsedFragment, traf: ParsedTraf, timing: FragmentTiming) -> bytes:
        """``traf``'s track of ``parsed`` as a fragment of its own (``parsed`` carries several)."""
        ...


class WireFormat(Protocol):
    """One ingest protocol: see the module docstring."""

    @property
    def name(self) -> str: ...

    @property
    def plan(self) -> RequestPlan: ...

    @property
    def receiver(self) -> ReceiverRules: ...

    def header(self, stream_id: str, tracks: Sequence[TrackDescription]) -> StreamHeader:
        """The exact header bytes of a stream of ``tracks``: the same for every encoder group."""
        ...

    def fragment(self, index: int, runs: Sequence[TrackRun]) -> bytes:
        """Fragment ``index`` (``moof`` + ``mdat``) carrying ``runs``."""
        ...

    def fragment_template(self, samples: Sequence[Sample]) -> MovieFragmentTemplate:
        """A one-track fragment of ``samples`` whose ``render(index, track_id, base_time)`` is
        byte for byte ``fragment(index, [TrackRun(track_id, base_time, samples, index)])``."""
        ...
