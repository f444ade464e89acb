"""What a relay reads from an encoder, without I/O: one POST body in, header and fragments out,
each fragment judged against what the relay already forwarded for its stream.

Theory of operation
-------------------
A third-party encoder POSTs a Smooth ingest stream (ftyp, Live Server Manifest, moov, then
moof + mdat pairs) and gets no acknowledgement per fragment: what the relay read is, for the
encoder, sent. Encoders as they really behave (the first field report; ffmpeg's ``ismv`` push):

* no probe POST, ``Connection: close``, one long chunked POST per stream;
* a first fragment stamped before zero (AAC priming: ffmpeg writes tfxd time -213,333 as an
  unsigned 64-bit number): tfxd times are read as *signed* 64-bit (the format's rule,
  :func:`orchestrator.wire.smooth.signed_time`), so it is -213,333 and the next audio fragment
  follows it;
* ``mfhd`` numbered across the tracks of the stream (video 1, 3, 5 ...; audio 2, 4, 6 ...) and
  no ``tfdt``: the relay never judges by ``mfhd``. A fragment's *index* is its time on the
  profile's fragment grid, ``round(time / (fragment_duration x timescale))``, the same for every
  track and for every encoder whose timestamps agree; its *phase* is how far its time lies from
  that grid point, in ticks (exported, so that two relays can be compared: see docs/relay.md);
* an encoder that reconnects and resends its last fragments: a fragment whose (track, time) the
  relay forwarded recently (the last ``RECENT`` per track) is a *duplicate*, dropped and
  counted, never forwarded twice;
* an encoder that restarts with a new header (other bytes): the stream's timeline starts afresh
  (its timestamps may start again at zero) and the caller announces the header, which re-opens
  the outbound POSTs with it. A restart with the same header whose first fragment of a track
  goes back in time, to a time not recently forwarded, is a *timeline reset* of that track:
  forwarded and counted (the receivers judge it; holding the stream back would lose it);
* within one POST a track's times must increase; a fragment that goes back and is not a
  duplicate is *rejected* (counted, the POST goes on). A fragment later in a POST that lies
  before the last time forwarded but was never forwarded (the encoder resends further back
  than ``RECENT``) is forwarded: the receivers de-duplicate by time, and it may be one they lack.

A fragment with several ``traf`` boxes is split into one single-track fragment per track (the
format rebuilds it, as the ingest archive does); a single-track fragment is forwarded as the
exact bytes received. Memory per POST is bounded by the reader's box limits; per stream, by
``RECENT`` times per track.

:class:`StreamTimeline` is the per-stream memory (across POSTs, and restored from the durable
spool after a restart); :class:`EncoderPost` reads one POST, h11-style::

    post = EncoderPost(timeline, fragment_duration)
    post.feed(chunk)
    while (event := post.next_event()) is not NEED_DATA:
        ...  # HeaderReceived, Forward or Dropped
    post.end_of_body()
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from orchestrator.errors import BoxError, MediaError
from orchestrator.fmp4.boxes import ParsedFragment, ParsedTraf
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, NeedData, StreamReader
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.tracks import is_continuous
from orchestrator.wire import smooth
from orchestrator.wire.format import FragmentTiming

RECENT = 64  # forwarded times remembered per track for duplicate detection (about 2 minutes of 2 s fragments)


def grid(time: int, fragment_ticks: Fraction) -> tuple[int, int]:
    """(index, phase): the fragment grid point nearest ``time`` (halves round up) and ``time``
    minus that point's tick (rounded the same way); ``fragment_ticks`` is the profile's fragment
    duration in the track's ticks."""
    twice = 2 * fragment_ticks
    index = (2 * time + fragment_ticks) // twice
    point = (2 * index * fragment_ticks + 1) // 2
    return int(index), time - int(point)


@dataclass(frozen=True)
class HeaderReceived:
    """The POST's stream header. ``changed``: the stream had another header before (an encoder
    restarted with new settings); False for the first header and for the same bytes again."""

    header: StreamHeader
    changed: bool


@dataclass(frozen=True)
class Forward:
    """A fragment to forward. ``phase``: its time minus the grid point of its index, in ticks;
    ``sample_duration``: its mean sample duration in ticks (how close two encoders' phases
    should be); ``reset``: the first fragment after a timeline reset of its track."""

    fragment: EncodedFragment
    phase: int
    sample_duration: int
    reset: bool = False


DropReason = Literal["duplicate", "rejected"]


@dataclass(frozen=True)
class Dropped:
    """A fragment not forwarded: a duplicate (forwarded before), or rejected (``detail`` says why)."""

    stream_id: str
    track_id: int
    time: int | None
    reason: DropReason
    detail: str


Event = HeaderReceived | Forward | Dropped


@dataclass
class _TrackMemory:
    last_time: int | None = None
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_set: set[int] = field(default_factory=set)

    def remember(self, time: int) -> None:
        if len(self.recent) == self.recent.maxlen:
            self.recent_set.discard(self.recent[0])
        self.recent.append(time)
        self.recent_set.add(time)
        self.last_time = time if self.last_time is None else max(self.last_time, time)

    def forget(self) -> None:
        self.last_time = None
        self.recent.clear()
        self.recent_set.clear()


class StreamTimeline:
    """What the relay forwarded for one stream: its header and, per track, the recent times."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.header: StreamHeader | None = None
        self._tracks: dict[int, _TrackMemory] = {}

    def take_header(self, header: StreamHeader) -> bool:
        """Adopt ``header``; True if it replaces a different one (the timeline starts afresh)."""
        changed = self.header is not None and self.header.data != header.data
        if changed:
            self._tracks.clear()
        self.header = header
        return changed

    def is_duplicate(self, track_id: int, time: int) -> bool:
        memory = self._tracks.get(track_id)
        return memory is not None and time in memory.recent_set

    def last_time(self, track_id: int) -> int | None:
        memory = self._tracks.get(track_id)
        return None if memory is None else memory.last_time

    def forwarded(self, track_id: int, time: int) -> None:
        """``time`` of ``track_id`` was forwarded (or recovered from the spool)."""
        self._tracks.setdefault(track_id, _TrackMemory()).remember(time)

    def reset(self, track_id: int) -> None:
        self._tracks.setdefault(track_id, _TrackMemory()).forget()


def stream_header(stream_id: str, header: Header) -> StreamHeader:
    """The :class:`StreamHeader` the publishers send, from a header read off the wire."""
    return StreamHeader(stream_id, header.tracks, header.data)


class EncoderPost:
    """One POST body from an encoder (see the module docstring)."""

    def __init__(self, timeline: StreamTimeline, fragment_duration: Fraction) -> None:
        self.timeline = timeline
        self.fragment_duration = fragment_duration
        self.rules = smooth.RECEIVER
        self._reader = StreamReader(manifest=self.rules.manifest, require_manifest=self.rules.require_manifest)
        self._tracks: dict[int, tuple[int, bool]] = {}  # track -> (timescale, continuous), from the header
        self._seen: dict[int, int] = {}  # track -> the last time this POST carried
        self._queue: deque[Event] = deque()

    @property
    def reserved(self) -> int:
        """Bytes the reader holds or is about to hold (see StreamReader.reserved)."""
        return self._reader.reserved

    @property
    def header_seen(self) -> bool:
        return self._reader.header is not None

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises MediaError (BoxError included) for a stream that
        cannot go on: the POST ends; the timeline is unchanged by the broken fragment."""
        while not self._queue:
            event = self._reader.next_event()
            if event is NEED_DATA:
                return NEED_DATA
            if isinstance(event, Header):
                self._tracks = {t.track_id: (t.timescale, is_continuous(t.handler)) for t in event.tracks}
                header = stream_header(self.timeline.stream_id, event)
                self._queue.append(HeaderReceived(header, self.timeline.take_header(header)))
            elif isinstance(event, Fragment):
                self._queue.extend(self._judge(event))
        return self._queue.popleft()

    def end_of_body(self) -> None:
        """The body ended. Raises MediaError if it stopped inside the header or a box; an empty
        body is a probe and fine."""
        if self._reader.bytes_received == 0:
            return
        if self._reader.header is None:
            raise MediaError("the body ended before the header (ftyp, manifest, moov) was complete")
        if self._reader.buffered:
            raise MediaError(f"the body ended inside a box ({self._reader.buffered} bytes left over)")

    def _judge(self, fragment: Fragment) -> list[Event]:
        parsed = fragment.parsed
        out: list[Event] = []
        for traf in parsed.trafs:
            if traf.track_id not in self._tracks:
                raise MediaError(f"fragment at offset {fragment.offset} carries track {traf.track_id}, "
                                 "which the moov does not declare")  # fmt: skip
            try:
                timing = self.rules.timing(traf, parsed.sequence_number)  # times signed (smooth.signed_time)
            except BoxError as exc:
                raise BoxError(f"fragment at offset {fragment.offset}: {exc}") from None
            problem = self.rules.problem(traf)
            if problem is None and timing.time is None:
                problem = "traf gives no time"
            if problem is not None or timing.time is None:
                out.append(Dropped(self.timeline.stream_id, traf.track_id, None, "rejected", problem or ""))
                continue
            out.append(self._decide(traf.track_id, timing.time, timing, parsed, traf))
        return out

    def _decide(self, track_id: int, time: int, timing: FragmentTiming, parsed: ParsedFragment,
                traf: ParsedTraf) -> Event:  # fmt: skip
        stream_id, timeline = self.timeline.stream_id, self.timeline
        if timeline.is_duplicate(track_id, time):
            self._seen[track_id] = max(time, self._seen.get(track_id, time))
            return Dropped(stream_id, track_id, time, "duplicate", "forwarded before")
        previous_in_post = self._seen.get(track_id)
        if previous_in_post is not None and time <= previous_in_post:
            return Dropped(stream_id, track_id, time, "rejected", f"time {time} does not follow {previous_in_post}")
        last = timeline.last_time(track_id)
        # Back in time, and not a fragment forwarded recently: as a POST's first fragment of the
        # track, the encoder's timeline went back (a restart); later in a POST, a fragment the
        # relay never had (an older one the encoder resends): forwarded, the timeline kept.
        reset = previous_in_post is None and last is not None and time <= last
        if reset:
            timeline.reset(track_id)
        self._seen[track_id] = time
        timeline.forwarded(track_id, time)
        timescale, continuous = self._tracks[track_id]
        index, phase = grid(time, self.fragment_duration * timescale)
        data = parsed.data if len(parsed.trafs) == 1 else self.rules.single_track_fragment(parsed, traf, timing)
        samples = max(1, len(traf.samples))
        fragment = EncodedFragment(stream_id, track_id, index, time, timing.duration, timescale, data, continuous)
        return Forward(fragment, phase, traf.duration // samples, reset)
