"""The local publishing point's CMAF ingest side (DASH-IF Interface-1): one request per CMAF
header or segment, checked and archived through the same receiver core as Smooth.

Theory of operation
-------------------
A CMAF sender POSTs (or PUTs) each track's CMAF header, then each segment of that track as a
request of its own (:mod:`orchestrator.wire.cmaf`). The paths are the ``template`` scheme's,
``/<point path>/<stream>/<track>/init.m4s`` and ``/<point path>/<stream>/<track>/<n>.m4s``
(:func:`parse_path`): unambiguous, unlike a ``Streams(<name>)`` path, which a Smooth POST also
uses (see docs/cmaf.md: the Streams() form is for origins, not this local point yet).

:class:`CmafPoint` turns the requests into what :class:`~orchestrator.ingest.receiver.PublishingPoint`
already checks, de-duplicates and archives, with CMAF's :data:`~orchestrator.wire.cmaf.RECEIVER`
rules: each CMAF track is a stream of the publishing point (``StreamPath(<point>/<stream>,
<track>)``, archived as ``<point>/<stream>/<track>/track<ID>.mp4``, a playable CMAF track file),
and each segment request is fed to it as one body, the track's stored header followed by the
segment's ``moof`` + ``mdat``. So:

* **init before media**: a header must be one ``ftyp`` + ``moov`` with one track (else 400);
  a segment for a track whose header has not arrived is answered 412 (ingest spec, general 20:
  "missing or incorrect init fragment"), and the sender then sends the header again;
* **box order**: a segment is ``[styp] [prft] moof mdat`` (:func:`~orchestrator.wire.cmaf.split_segment`,
  else 400); ``lmsg`` in ``styp`` marks the track ended (counted);
* **de-duplication** by (track, tfdt) across groups and requests, conflicts and gaps: the
  receiver core's, unchanged;
* **increasing tfdt**: a segment that is archived with a time before the track's newest is
  counted as ``late`` (a gap filled by the other group, or a resend after an outage): it is
  archived in arrival order, as the Smooth side does, because dropping it would lose the only
  copy;
* **fixed segment duration** (ingest spec: "segment duration fixed"; :class:`SegmentDurations`):
  a track's first archived segment establishes its segment duration ``D``: the sum of its
  ``trun`` sample durations, an exact integer in the track's timescale. A later archived segment
  of duration ``d`` keeps to it when ``|d - D|`` is at most one frame (the segment's longest
  sample): segment boundaries are fixed in time, but a segment holds whole frames, so when a
  boundary falls between frames the duration moves by one (48 kHz AAC in 2 s segments holds 93
  or 94 frames of 1024 ticks: 95232 or 96256). A segment further off is *off duration*: counted
  (``tolerated["segment_duration"]`` in the status, and so in the ``orchestrator_ingest_tolerated``
  metric; per track in ``segment_durations``), logged once per track with its values, and
  archived all the same, because it is the only copy of those samples. Tolerated, not counted:

  - a segment whose ``styp`` carries ``lmsg`` (the declared last one);
  - a *shorter* segment that turns out to be the last of its track: a shorter one is judged only
    when a later segment of the track arrives (until then it is held as ``pending``, one per
    track);
  - a short *first* segment (an encoder that starts between two boundaries): when the second
    segment is longer than the first by more than a frame, the third decides. If it agrees with
    the second, the first was a short opening segment and ``D`` is the second's duration;
    otherwise the second is counted and ``D`` stays the first's.

  Only archived segments are judged: the other group's copy of a segment is a duplicate, and a
  duplicate whose duration differs is the receiver's *conflict*. A change of ``tfdt`` step (a
  hole) is the receiver's *gap*.

Memory: one stored header per CMAF track (at most 1 MiB each, the reader's limit), a few
integers per track for the duration check, and at most ``MAX_TRACKS`` tracks; bodies are
bounded by the server (``MAX_BODY``). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import BoxError, MediaError
from orchestrator.fmp4.reader import NEED_DATA, Header, StreamReader
from orchestrator.ingest.receiver import (
    STATUS_POSTS,
    Decision,
    FragmentInfo,
    PostStatus,
    PublishingPoint,
    StreamPath,
    is_safe_name,
)
from orchestrator.wire import cmaf

MAX_TRACKS = 10_000
MAX_BODY = 64 * 1024 * 1024  # one segment: 6 s of 80 Mb/s video is 60 MB

_TEMPLATE = re.compile(r"/(?P<point>.+)/(?P<stream>[^/]+)/(?P<track>[^/]+)/(?P<object>init|[0-9]{1,10})\.m4s")


@dataclass(frozen=True)
class CmafPath:
    """A CMAF request: the track it feeds (as a stream of the publishing point) and the segment
    index, or None for the track's CMAF header."""

    track: StreamPath
    index: int | None


def parse_path(path: str) -> CmafPath | None:
    """The CMAF track and object of a request path (the ``template`` scheme), or None if it is
    not one. Raises ValueError for a path whose parts are not all safe names."""
    match = _TEMPLATE.fullmatch(path)
    if match is None:
        return None
    parts = (*match["point"].split("/"), match["stream"], match["track"])
    for part in parts:
        if not is_safe_name(part) or part.lower().endswith(".mp4"):
            raise ValueError(f"unsafe name {part!r} in ingest path {path!r}")
    index = None if match["object"] == "init" else int(match["object"])
    return CmafPath(StreamPath(parts[:-1], parts[-1]), index)


@dataclass(frozen=True)
class Answer:
    status: int
    text: str
    notices: tuple[str, ...] = field(default=(), compare=False)  # log lines (a track off its duration)


@dataclass
class _TrackDuration:
    established: int  # the track's segment duration (see the module docstring)
    off: int = 0  # segments off it by more than a frame
    logged: bool = False
    opening: bool = True  # only the first segment is judged yet
    pending: FragmentInfo | None = None  # a shorter segment, judged when a later one arrives
    undecided: FragmentInfo | None = None  # a second segment longer than the first, judged by the third


class SegmentDurations:
    """The fixed-duration check of every CMAF track (see the module docstring); each segment
    off duration counts one ``segment_duration`` in ``tolerated``. Pure."""

    def __init__(self, tolerated: Counter[str]) -> None:
        self._tracks: dict[tuple[StreamPath, int], _TrackDuration] = {}
        self._tolerated = tolerated

    def archived(self, track: StreamPath, fragment: FragmentInfo, *, last: bool) -> list[str]:
        """Judge ``fragment``, an archived segment of ``track`` (``last``: its styp carries
        lmsg). The log lines to write: at most one per track, ever."""
        key = (track, fragment.track_id)
        state = self._tracks.get(key)
        if state is None:
            if not last:
                self._tracks[key] = _TrackDuration(fragment.duration)
            return []
        notices: list[str] = []
        pending = state.pending
        if pending is not None and (fragment.time or 0) > (pending.time or 0):  # CMAF segments have a tfdt
            state.pending = None  # a later segment came: the shorter one was not the last
            notices += self._off(track, state, pending)
        undecided = state.undecided
        if undecided is not None and not last:
            state.undecided = None
            if abs(fragment.duration - undecided.duration) <= fragment.frame:
                state.established = undecided.duration  # the first segment was a short opening one
            else:
                notices += self._off(track, state, undecided)
        opening, state.opening = state.opening, False
        if last or abs(fragment.duration - state.established) <= fragment.frame:
            return notices
        if opening and fragment.duration > state.established:
            state.undecided = fragment  # the first one short, or this one long: the next one tells
        elif fragment.duration < state.established:
            state.pending = fragment
        else:
            notices += self._off(track, state, fragment)
        return notices

    def _off(self, track: StreamPath, state: _TrackDuration, fragment: FragmentInfo) -> list[str]:
        state.off += 1
        self._tolerated["segment_duration"] += 1
        if state.logged:
            return []
        state.logged = True
        return [f"ingest.cmaf.segment_duration track={track.point_name}/{track.stream_id} "
                f"track_id={fragment.track_id} index={fragment.index} time={fragment.time} "
                f"duration={fragment.duration} established={state.established} frame={fragment.frame} "
                f'note="the segment duration differs from the track\'s by more than one frame: archived; '
                f'logged once per track"']  # fmt: skip

    def status(self) -> dict[str, dict[str, dict[str, int]]]:
        """'<point>/<stream>/<track>' -> track ID -> its established duration and off count."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (track, track_id), state in sorted(self._tracks.items(), key=lambda item: (item[0][0].point_name,
                                               item[0][0].stream_id, item[0][1])):  # fmt: skip
            out.setdefault(f"{track.point_name}/{track.stream_id}", {})[str(track_id)] = {
                "duration": state.established, "off_duration": state.off}  # fmt: skip
        return out


class CmafPoint:
    """Every CMAF request of the local publishing point (see the module docstring)."""

    def __init__(self, point: PublishingPoint | None = None) -> None:
        self.point = point if point is not None else PublishingPoint(rules=cmaf.RECEIVER, detect_restarts=False)
        self._headers: dict[StreamPath, bytes] = {}
        self._newest: dict[tuple[StreamPath, int], int] = {}
        self.durations = SegmentDurations(self.point.tolerated)
        self.counts: Counter[str] = Counter()  # headers, segments, missing_init, malformed, late, last_segments

    def request(self, path: CmafPath, body: bytes, encoder_group: str | None, now: float,
                archive: Callable[[Decision], None]) -> Answer:  # fmt: skip
        """Check ``body`` sent to ``path``; ``archive`` applies each decision's writes (raising
        OSError if one fails: the fragment then stays acceptable). The answer to send."""
        if path.index is None:
            return self._header(path.track, body)
        header = self._headers.get(path.track)
        if header is None:
            self.counts["missing_init"] += 1
            return Answer(412, f"no CMAF header for {path.track.point_name}/{path.track.stream_id}: send it first\n")
        try:
            segment = cmaf.split_segment(body)
        except BoxError as exc:
            self.counts["malformed"] += 1
            return Answer(400, f"{exc}\n")
        self.counts["segments"] += 1
        post = self.point.open_post(path.track, encoder_group, now)
        status: PostStatus = "error"
        reason: str | None = "server error"
        notices: list[str] = []
        try:
            post.feed(header + segment.fragment)
            while (decision := post.next_decision()) is not NEED_DATA:
                if decision.outcome == "archived":
                    archive(decision)
                    post.written(decision)
                    self._note_time(path.track, decision)
                    notices += self.durations.archived(path.track, decision.fragment, last=segment.last)
                elif decision.outcome == "rejected":
                    self.counts["malformed"] += 1
                    status, reason = "error", decision.reason or "rejected"
                    return Answer(400, f"{reason}\n")
            post.end_of_body()
            status, reason = "ok", None
        except MediaError as exc:
            self.counts["malformed"] += 1
            status, reason = "error", str(exc)
            return Answer(400, f"{exc}\n")
        finally:
            post.close(now, status, reason)
        if segment.last:
            self.counts["last_segments"] += 1
        return Answer(200, "", tuple(notices))

    def _header(self, track: StreamPath, body: bytes) -> Answer:
        reader = StreamReader()
        try:
            reader.feed(body)
            event = reader.next_event()
            rest = reader.next_event()
        except MediaError as exc:
            self.counts["malformed"] += 1
            return Answer(400, f"not a CMAF header: {exc}\n")
        if (not isinstance(event, Header) or rest is not NEED_DATA or reader.buffered or len(event.tracks) != 1
                or event.ftyp + event.moov != body):  # fmt: skip
            self.counts["malformed"] += 1
            return Answer(400, "a CMAF header is one ftyp and one moov describing one track\n")
        if track not in self._headers and len(self._headers) >= MAX_TRACKS:
            return Answer(503, f"more than {MAX_TRACKS} CMAF tracks\n")
        self._headers[track] = body
        self.counts["headers"] += 1
        return Answer(200, "")

    def _note_time(self, track: StreamPath, decision: Decision) -> None:
        fragment = decision.fragment
        if fragment.time is None:
            return
        key = (track, fragment.track_id)
        newest = self._newest.get(key)
        if newest is not None and fragment.time < newest:
            self.counts["late"] += 1
        else:
            self._newest[key] = fragment.time

    def status(self, *, posts: bool = False, limit: int = STATUS_POSTS) -> dict[str, Any]:
        """The counts, and the publishing point's status (each segment request is one of its POSTs:
        ``limit`` of the newest, see :meth:`~orchestrator.ingest.receiver.PublishingPoint.status`)."""
        return {"counts": dict(sorted(self.counts.items())), "tracks": len(self._headers),
                "segment_durations": self.durations.status(),
                **self.point.status(posts=posts, limit=limit)}  # fmt: skip
