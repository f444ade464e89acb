"""The local publishing point, without I/O: checks ingest POSTs, drops duplicate fragments, decides
what goes into the archive.

Theory of operation
-------------------
The ingest server (:mod:`orchestrator.ingest.server`) is a thin shell around three pieces of this
module. None of them touches a socket, a file or a clock; time comes in as ``now``.

* :class:`PostChecker` checks one POST body, bytes in, events out. What depends on the wire
  format it asks the format's :class:`~orchestrator.wire.format.ReceiverRules` (Smooth's by
  default, :mod:`orchestrator.wire.smooth`): it wraps
  :class:`~orchestrator.fmp4.reader.StreamReader` with the format's manifest box, required, so
  every Smooth POST must open with ``ftyp``, the Live Server Manifest box and ``moov``, in that
  order (spec 3.1, 4.3). Then it checks each fragment: every ``traf`` passes the format's check
  (Smooth: it carries a ``tfxd``, 3.3), and per track within the POST the fragment time and
  index as the format reads them (Smooth: tfxd ``fragment_absolute_time``, else tfdt; tfxd v2
  ``fragment_index``, else ``mfhd.sequence_number``) strictly increase (3.8). A fragment failing
  either check is *rejected*: counted, not archived, and the POST goes on. A malformed box or
  header raises :class:`~orchestrator.errors.MediaError`, which ends the POST.

* :class:`PublishingPoint` is shared by every POST of every encoder group. Like the service in
  spec section 9 it keeps a single copy of each fragment, keyed by (stream, track,
  fragment_absolute_time), where a stream is (publishing point path, stream id): the first copy
  to arrive is archived, later copies are duplicates and dropped, whichever POST or group sends
  them. A duplicate whose index or duration differs from the archived copy's is also counted
  as a *conflict*: the groups are not aligned (spec 8.4, 8.5). A POST whose header bytes differ
  from the stream's first header counts a header mismatch (7.5.c, 8.3) and is still accepted;
  it says so in a notice, at most once a minute per stream (``MISMATCH_LOG_INTERVAL``).

  Encoders as they really behave (issue 20; ffmpeg 5.1's ``ismv`` push is the model): no probe
  POST, ``Connection: close``, no ``tfdt``, a first AAC fragment stamped before zero (a 64-bit
  time is read signed, :func:`orchestrator.wire.smooth.signed_time`; counted as
  ``negative_time``), ``mfhd`` numbered across tracks (so a *gap* is a hole in a track's
  timeline, judged by time and duration, never by missing indices), an encoder that reconnects
  and resends its last fragments (duplicates, dropped and counted per POST), and an encoder that
  *restarts*: a POST whose header differs from the last header of the same encoder group (no
  group counts as one). Its time may start again at zero: the first fragment of each track at or
  before the time the track last archived starts a new *timeline* of that track, a new file
  ``<track name>-<n>.mp4`` with its own de-duplication index (a notice says so); a restart that
  goes on in time continues the same files. What was tolerated is counted by kind
  (:attr:`PublishingPoint.tolerated`).

* :class:`Post` joins the two for one request, h11-style::

      post = point.open_post(path, encoder_group, now)
      post.feed(chunk)                      # as often as bytes arrive
      while (decision := post.next_decision()) is not NEED_DATA:
          for write in decision.writes: ... # append to the archive
          post.written(decision)            # only now is the fragment archived
      for notice in post.take_notices(): ...  # things worth a log line (a track redefined)
      post.end_of_body()                    # the body ended: anything left over is an error
      post.close(now, "ok")                 # or "error" / "disconnected" / "cancelled"

  A decision to archive changes the publishing point only when the caller says its writes
  succeeded (:meth:`Post.written`): a failed write leaves the fragment acceptable again, so the
  encoder's resend is archived rather than dropped as a duplicate.

Limits, all checked on bytes as they arrive, so the work per POST is bounded by the bytes
received (see also :mod:`orchestrator.fmp4.boxes` and :mod:`orchestrator.fmp4.reader`): a header
box (the manifest included) of at most 1 MiB, a manifest of at most ``MAX_MANIFEST_ELEMENTS``
elements, at most 16 truns per traf and 10,000 samples per fragment, one per mdat byte at
most, no two samples sharing bytes. The :class:`PublishingPoint` keeps a *memory budget* over
all POSTs: each POST reserves the bytes its reader holds or is about to hold (the declared
size of the box it is receiving); a POST that would exceed the budget raises
:class:`~orchestrator.errors.IngestOverloaded` and ends. Any other exception while reading a
POST (a bug of ours, a field no writer can carry) ends that POST with a MediaError naming it;
the publishing point's state is unchanged by it, so the stream is never poisoned.

A stream's header is compared by digest (32 bytes kept, not the header); a track's init segment
is dropped once written. A later header that defines a known track ID differently (another
timescale, codec configuration, handler, size or language) starts a new track file,
``<track name>-<n>.mp4``, with its own de-duplication index, and says so in a notice: two track
definitions never share a file.

The archive holds one file per (stream, track), ``<point path>/<stream id>/<track name>.mp4``:
a single-track init segment (``ftyp`` + ``moov``), written with the track's first archived
fragment, then that track's fragments in arrival order. A fragment carrying only that track is
archived as the exact bytes received; one carrying several tracks is rebuilt per track by the
format (Smooth: :func:`~orchestrator.wire.smooth.write_fragment`; samples, durations,
composition offsets and the sync flag survive; other sample flags do not; tfdt is set to the
tfxd time). The init segment is the format's too (Smooth: the ``isml`` ftyp and the track's
``moov``).

Memory, bounded whatever the run time and the number of POSTs:

* the de-duplication index keeps (time -> index, duration) for the last ``DEDUP_WINDOW``
  fragments archived per track (about 2.3 hours of 2-second fragments), their times also kept
  sorted for the gap count. A fragment older than
  everything the index still remembers (its time at or below the newest time it forgot) is
  treated as a duplicate: it was archived then, or it arrives hours late and would land out of
  order in the archive; it is counted, never archived twice. ``gaps`` counts holes
  in the timeline (a fragment that ends more than a millisecond short of the next one's time),
  kept up to date as each fragment fills, splits or opens one, and only for a continuous track
  (one whose ``hdlr`` is a kind with a fragment for every moment, :mod:`orchestrator.tracks`;
  an unknown handler counts as continuous): a sparse track's silences are not gaps;
* the per-POST log keeps the last ``POST_LOG_SIZE`` POSTs; each POST's record keeps its last
  ``FRAGMENT_LOG_SIZE`` fragments, fewer when many POSTs are active at once: a record opened
  while ``n`` POSTs are active keeps ``max(FRAGMENT_LOG_MIN, FRAGMENT_LOG_BUDGET // n)`` at
  most. The records of n active POSTs opened one after another hold at most about
  ``FRAGMENT_LOG_BUDGET x (1 + ln(n / 100))`` entries (about 470,000 for 4,000 POSTs, a few
  dozen bytes each), whatever the run time; the log of closed POSTs at most
  ``POST_LOG_SIZE x FRAGMENT_LOG_SIZE``. :meth:`PublishingPoint.status` lists at most
  ``STATUS_POSTS`` records (``limit``: up to ``POST_LOG_SIZE``) of ``STATUS_FRAGMENTS`` entries
  each, or one record whole (``post_id``): the answer is bounded too (the whole log, 200 x
  1,000 entries, took 6.1 s and 30 MiB to render).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.errors import BoxError, IngestOverloaded, MediaError, over_limit
from orchestrator.fmp4.boxes import ParsedFragment, ParsedTraf
from orchestrator.fmp4.reader import NEED_DATA, Fragment, Header, NeedData, StreamReader
from orchestrator.tracks import is_continuous
from orchestrator.wire import smooth
from orchestrator.wire.format import FragmentTiming, ReceiverRules

Outcome = Literal["archived", "duplicate", "rejected"]
PostStatus = Literal["active", "ok", "error", "disconnected", "cancelled"]

POST_LOG_SIZE = 200
FRAGMENT_LOG_SIZE = 1000
MAX_MANIFEST_ELEMENTS = smooth.MAX_MANIFEST_ELEMENTS
DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024
FRAGMENT_LOG_BUDGET = 100_000  # fragment entries over the records of all active POSTs
FRAGMENT_LOG_MIN = 10
DEDUP_WINDOW = 4096  # fragments remembered per track for de-duplication
RETIRED_KEPT = 32  # earlier timelines of a stream's tracks kept in /status after restarts
HEADERS_KEPT = 16  # encoder groups whose last header a stream remembers (restart detection)
MISMATCH_LOG_INTERVAL = 60.0  # seconds between two log lines about one stream's header mismatches
STATUS_FRAGMENTS = 100  # fragment entries per record in /status?posts=1; a whole record with ?post=<id>
STATUS_POSTS = 50  # POST records in /status?posts=1 (the newest); more with posts=<n>, at most POST_LOG_SIZE

# --- addresses and names ------------------------------------------------------------------

# A name that is safe as one path component on any file system: no "..", no separators.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_safe_name(name: str) -> bool:
    """True if ``name`` can be used as one file or directory name under the archive."""
    return _SAFE_NAME.fullmatch(name) is not None


@dataclass(frozen=True, order=True)
class StreamPath:
    """Where a POST goes, and so which stream it feeds: the publishing point path (without
    ``.isml``, split at slashes) and the stream id of ``Streams(<id>)``."""

    point: tuple[str, ...]
    stream_id: str

    @property
    def point_name(self) -> str:
        return "/".join(self.point)

    def __str__(self) -> str:
        return f"/{self.point_name}.isml/Streams({self.stream_id})"


def parse_stream_path(path: str) -> StreamPath | None:
    """The stream a request path addresses, or None if it is not an ingest URL at all.

    ``path`` is the percent-decoded path. Raises ValueError if it is an ingest URL whose parts
    are not all safe names (``..``, empty parts, odd characters), so that a request can never
    name a file outside the archive.
    """
    match = smooth.parse_path(path)  # MS-SSTR 9.2 / ingest spec 4: {point}.isml/Streams({id})
    if match is None:
        return None
    parts = tuple(match[0].split("/"))
    stream_id = match[1]
    for part in (*parts, stream_id):
        if not is_safe_name(part):
            raise ValueError(f"unsafe name {part!r} in ingest path {path!r}")
        # Directories are named after these parts and track files end in .mp4: a part ending in
        # .mp4 could name another stream's track file as a directory.
        if part.lower().endswith(".mp4"):
            raise ValueError(f"{part!r} in ingest path {path!r} ends in .mp4, which names track files in the archive")
    return StreamPath(parts, stream_id)


def track_names(smil: str | None) -> dict[int, str]:
    """See :func:`orchestrator.wire.smooth.track_names` (Smooth's manifest names the tracks)."""
    return smooth.track_names(smil)


# --- one POST -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FragmentInfo:
    """One track's part of a fragment, as counters and logs see it."""

    track_id: int
    # As the wire format reads them (Smooth: :meth:`~orchestrator.wire.smooth.SmoothReceiverRules.timing`).
    index: int  # Smooth: tfxd v2 fragment_index, else mfhd.sequence_number
    time: int | None  # Smooth: tfxd fragment_absolute_time, else tfdt; None if the traf has neither
    duration: int  # Smooth: tfxd fragment_duration, else the sum of the sample durations
    # The longest sample duration in the traf (0 without samples): one frame, the slack a
    # segment's duration may have when its boundaries fall between frames (CMAF: cmafpoint).
    frame: int = field(default=0, compare=False)


@dataclass(frozen=True)
class CheckedFragment:
    """A fragment as :class:`PostChecker` judged it: one :class:`FragmentInfo` per ``traf``, in
    order, and why it is rejected (None: accepted)."""

    fragment: Fragment
    tracks: tuple[FragmentInfo, ...]
    rejected: str | None


def _fragment_info(rules: ReceiverRules, fragment: Fragment, traf_at: int) -> FragmentInfo:
    parsed = fragment.parsed
    traf = parsed.trafs[traf_at]
    try:
        timing = rules.timing(traf, parsed.sequence_number)
    except BoxError as exc:
        raise over_limit(BoxError(f"fragment at offset {fragment.offset}: {exc}"), None, exc) from None
    frame = max((sample.duration for sample in traf.samples), default=0)
    return FragmentInfo(traf.track_id, timing.index, timing.time, timing.duration, frame)


class PostChecker:
    """Checks one POST body. ``feed`` bytes, then call ``next_event`` until ``NEED_DATA``.

    ``next_event`` returns the :class:`~orchestrator.fmp4.reader.Header` once, then a
    :class:`CheckedFragment` per fragment; other top-level boxes after the header (``mfra``,
    ``free`` ...) are skipped, as the service ignores them (spec 3.2, 3.5). It raises
    MediaError for a stream that cannot go on; the checker is then unusable. ``rules``: the
    wire format's checks (Smooth's by default).
    """

    def __init__(self, rules: ReceiverRules = smooth.RECEIVER) -> None:
        self.rules = rules
        self._reader = StreamReader(manifest=rules.manifest, require_manifest=rules.require_manifest)
        self._last: dict[int, tuple[int, int]] = {}  # track -> (time, index) last accepted

    @property
    def header(self) -> Header | None:
        return self._reader.header

    @property
    def reserved(self) -> int:
        """See :attr:`orchestrator.fmp4.reader.StreamReader.reserved`."""
        return self._reader.reserved

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_event(self) -> Header | CheckedFragment | NeedData:
        while True:
            event = self._reader.next_event()
            if event is NEED_DATA or isinstance(event, Header):
                return event
            if isinstance(event, Fragment):
                return self._check(event)

    def end_of_body(self) -> None:
        """The body ended. Raises MediaError if it stopped inside the header or a box. An empty
        body is fine: it is the encoder's probe (spec 4, requirement 1)."""
        if self._reader.bytes_received == 0:
            return
        if self._reader.header is None:
            raise MediaError("the body ended before the header (ftyp, manifest, moov) was complete")
        if self._reader.buffered:
            raise MediaError(f"the body ended inside a box ({self._reader.buffered} bytes left over)")

    def _check(self, fragment: Fragment) -> CheckedFragment:
        assert self._reader.header is not None  # the reader hands out fragments only after it
        declared = {track.track_id for track in self._reader.header.tracks}
        parsed = fragment.parsed
        infos: list[FragmentInfo] = []
        for traf in parsed.trafs:
            if traf.track_id not in declared:
                raise MediaError(
                    f"fragment at offset {fragment.offset} carries track {traf.track_id}, "
                    f"which the moov does not declare"
                )
            infos.append(_fragment_info(self.rules, fragment, len(infos)))
        last = dict(self._last)
        for traf, info in zip(parsed.trafs, infos, strict=True):
            problem = self.rules.problem(traf)
            if problem is None and info.time is None:
                problem = "traf gives no time"
            if problem is not None:
                return CheckedFragment(fragment, tuple(infos), f"track {traf.track_id}: {problem}")
            time, index = info.time, info.index
            assert time is not None
            previous = last.get(traf.track_id)
            if previous is not None and time <= previous[0]:
                reason = f"track {traf.track_id}: time {time} does not follow {previous[0]}"
                return CheckedFragment(fragment, tuple(infos), reason)
            if previous is not None and index <= previous[1]:
                reason = f"track {traf.track_id}: index {index} does not follow {previous[1]}"
                return CheckedFragment(fragment, tuple(infos), reason)
            last[traf.track_id] = (time, index)
        self._last = last
        return CheckedFragment(fragment, tuple(infos), None)


# --- the publishing point -----------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveWrite:
    """Bytes to append to one archive file."""

    path: tuple[str, ...]  # relative to the archive directory; every part passes is_safe_name
    data: bytes = field(repr=False)
    new_file: bool = False  # an init segment: start the file afresh


@dataclass(frozen=True)
class Decision:
    """What the publishing point did with one track's part of a fragment. An ``archived`` one
    takes effect when the caller confirms its writes with :meth:`Post.written`."""

    post_id: int
    stream: StreamPath
    fragment: FragmentInfo
    outcome: Outcome
    reason: str | None = None  # why it was rejected, or how a conflicting duplicate differs
    conflict: bool = False
    writes: tuple[ArchiveWrite, ...] = ()
    # The fragment as received (every track of it), for the confidence monitor: a reference, not a copy.
    received: bytes = field(default=b"", repr=False, compare=False)


@dataclass
class _Track:
    track_id: int
    name: str
    file: tuple[str, ...]  # the archive file, relative to the archive directory
    timescale: int
    init: bytes = field(repr=False)  # dropped (b"") once written
    key: str = ""  # in /status: the track ID, and "<id>-<n>" for a later definition or timeline of it
    continuous: bool = True  # a fragment for every moment of its timeline: a hole in time is a gap
    definition: tuple[int, bytes] = (0, b"")  # (track ID, sha256 of the init segment): its key in _Stream.tracks
    init_written: bool = False
    received: int = 0
    archived: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    negative_times: int = 0  # fragments archived at a time below zero (read as signed: AAC priming)
    first_index: int | None = None
    last_index: int | None = None
    last_time: int | None = None
    # The last DEDUP_WINDOW archived fragments, time -> (index, duration), in archive order.
    by_time: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    forgotten_time: int | None = None  # the newest time dropped from by_time
    times: list[int] = field(default_factory=list, repr=False)  # the keys of by_time, sorted
    holes: int = 0  # holes in the timeline: a fragment that does not reach the next one's time

    @property
    def gaps(self) -> int:
        """Holes in the archived timeline (a run of missing fragments is one); 0 for a sparse track.

        Judged by time, not by index: ffmpeg numbers its ``mfhd`` across the tracks of a stream
        (video 1, 3, 5 ..., audio 2, 4, 6 ...), so missing indices are no evidence of anything."""
        return self.holes if self.continuous else 0

    def seen(self, time: int) -> bool:
        """True if a fragment at ``time`` was archived, as far as the bounded index can tell."""
        return time in self.by_time or (self.forgotten_time is not None and time <= self.forgotten_time)

    def _hole(self, before: int, after: int) -> bool:
        """True if the fragment at ``before`` ends short of ``after`` (by more than a millisecond:
        durations rounded to the timescale do not make a hole)."""
        return before + self.by_time[before][1] + self.timescale // 1000 < after

    def archive(self, index: int, time: int, duration: int) -> None:
        self.archived += 1
        self.by_time[time] = (index, duration)
        # The holes around the new fragment: it may fill one, split one, or open one at an end.
        at = bisect.bisect_left(self.times, time)
        before = self.times[at - 1] if at > 0 else None
        after = self.times[at] if at < len(self.times) else None
        if before is not None and after is not None and self._hole(before, after):
            self.holes -= 1
        if before is not None and self._hole(before, time):
            self.holes += 1
        if after is not None and self._hole(time, after):
            self.holes += 1
        self.times.insert(at, time)
        if len(self.by_time) > DEDUP_WINDOW:  # forgetting one changes no count: the holes stay counted
            oldest = next(iter(self.by_time))
            del self.by_time[oldest]
            del self.times[bisect.bisect_left(self.times, oldest)]
            self.forgotten_time = oldest if self.forgotten_time is None else max(self.forgotten_time, oldest)
        self.first_index = index if self.first_index is None else min(self.first_index, index)
        self.last_index = index if self.last_index is None else max(self.last_index, index)
        self.last_time = time if self.last_time is None else max(self.last_time, time)


@dataclass
class _Stream:
    header_digest: bytes | None = field(default=None, repr=False)  # sha256 of the first POST's header
    posts: int = 0
    header_mismatches: int = 0
    mismatch_logged: float | None = None  # when a header mismatch was last logged (rate limit)
    mismatches_unlogged: int = 0  # mismatches since then, not logged
    restarts: int = 0  # POSTs whose encoder came back with another header (a restart)
    # encoder group (None: the POST named none) -> sha256 of its last header; at most HEADERS_KEPT.
    last_header: dict[str | None, bytes] = field(default_factory=dict, repr=False)
    # (track ID, sha256 of its init segment) -> track: the current timeline of each definition.
    tracks: dict[tuple[int, bytes], _Track] = field(default_factory=dict)
    retired: list[_Track] = field(default_factory=list)  # earlier timelines, replaced after a restart
    files: set[str] = field(default_factory=set)  # track file names in use

    def all_tracks(self) -> list[_Track]:
        return [*self.retired, *self.tracks.values()]


@dataclass(frozen=True)
class _Pending:
    """An archived decision not yet confirmed by :meth:`Post.written`."""

    decision: Decision
    track: _Track
    time: int


@dataclass
class _PostRecord:
    id: int
    stream: StreamPath
    encoder_group: str | None
    started: float
    ended: float | None = None
    status: PostStatus = "active"
    reason: str | None = None
    bytes_received: int = 0
    fragments_seen: int = 0
    log_size: int = FRAGMENT_LOG_SIZE
    fragments: deque[tuple[FragmentInfo, Outcome]] = field(init=False, repr=False)
    outcomes: Counter[str] = field(default_factory=Counter)  # per-traf decisions by outcome

    def __post_init__(self) -> None:
        self.fragments = deque(maxlen=self.log_size)

    def as_json(self, fragments: int | None = None) -> dict[str, Any]:
        """The record; with ``fragments``, only the last that many fragment entries."""
        kept = list(self.fragments)
        if fragments is not None:
            kept = kept[-fragments:] if fragments > 0 else []
        return {
            "id": self.id,
            "publishing_point": self.stream.point_name,
            "stream": self.stream.stream_id,
            "encoder_group": self.encoder_group,
            "started": self.started,
            "ended": self.ended,
            "status": self.status,
            "reason": self.reason,
            "bytes_received": self.bytes_received,
            "fragments_seen": self.fragments_seen,
            "outcomes": dict(sorted(self.outcomes.items())),
            "fragments_not_listed": self.fragments_seen - len(kept),
            "fragments": [
                {"track": f.track_id, "index": f.index, "time": f.time, "duration": f.duration, "outcome": o}
                for f, o in kept
            ],
        }


class PublishingPoint:
    """Every stream of every publishing point path, shared by all POSTs. See the module docstring.

    ``memory_budget``: bytes that all POSTs together may hold in their readers (buffered, or
    declared by the box being received). ``rules``: the wire format's checks (Smooth's by
    default). ``detect_restarts``: a POST with another header than its encoder group's last one
    is a restart (see the module docstring); off for CMAF, whose every segment request carries
    the track's stored header, whichever sender stored it."""

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET, rules: ReceiverRules = smooth.RECEIVER, *,
                 detect_restarts: bool = True) -> None:  # fmt: skip
        self.rules = rules
        self.detect_restarts = detect_restarts
        self._streams: dict[StreamPath, _Stream] = {}
        self._log: deque[_PostRecord] = deque(maxlen=POST_LOG_SIZE)
        self._next_post_id = 1
        self._active = 0
        self.probes = 0
        self.memory_budget = memory_budget
        self._reserved: dict[int, int] = {}  # post id -> bytes reserved
        self._reserved_total = 0  # sum(self._reserved.values()), kept as it changes: read for every chunk
        self.memory_refusals = 0
        # What was tolerated, by kind: header_mismatch, encoder_restart, negative_time.
        self.tolerated: Counter[str] = Counter()

    @property
    def memory_reserved(self) -> int:
        """Bytes reserved by all open POSTs, never above ``memory_budget``."""
        return self._reserved_total

    def record_probe(self) -> None:
        """An empty-body POST (the encoder's probe, spec 4 requirement 1)."""
        self.probes += 1

    def open_post(self, path: StreamPath, encoder_group: str | None, now: float) -> Post:
        """Start a POST to ``path``; ``encoder_group`` is the ``X-Encoder-Group`` header, if sent."""
        self._active += 1
        log_size = min(FRAGMENT_LOG_SIZE, max(FRAGMENT_LOG_MIN, FRAGMENT_LOG_BUDGET // self._active))
        record = _PostRecord(self._next_post_id, path, encoder_group, now, log_size=log_size)
        self._next_post_id += 1
        self._log.append(record)
        stream = self._streams.setdefault(path, _Stream())
        stream.posts += 1
        return Post(self, record, stream)

    def status(self, *, posts: bool = False, limit: int = STATUS_POSTS, post_id: int | None = None) -> dict[str, Any]:
        """Counters per publishing point, stream and track, as plain JSON-able data.

        With ``posts``, also the per-POST log, oldest first: the newest ``limit`` records (at
        most ``POST_LOG_SIZE``), each with its last ``STATUS_FRAGMENTS`` fragment entries
        (``fragments_not_listed`` says how many it leaves out). With ``post_id``, that one
        record in full (every entry its log keeps), or an empty log if it is not kept. The
        answer is bounded whatever the run: with every record full it took 6.1 s and 30 MiB."""
        points: dict[str, Any] = {}
        for path, stream in sorted(self._streams.items()):
            streams = points.setdefault(path.point_name, {"streams": {}})["streams"]
            streams[path.stream_id] = {
                "posts": stream.posts,
                "header_mismatches": stream.header_mismatches,
                "restarts": stream.restarts,
                "tracks": {track.key: _track_json(track) for track in stream.all_tracks()},
            }
        out: dict[str, Any] = {
            "posts": {"total": self._next_post_id - 1, "active": self._active},
            "probes": self.probes,
            "memory": {
                "budget": self.memory_budget,
                "reserved": self.memory_reserved,
                "refusals": self.memory_refusals,
            },
            "tolerated": dict(sorted(self.tolerated.items())),
            "publishing_points": points,
        }
        if post_id is not None:
            out["post_log"] = [record.as_json() for record in self._log if record.id == post_id]
        elif posts:
            limit = max(0, min(limit, POST_LOG_SIZE))
            records = list(self._log)[len(self._log) - limit :] if limit else []
            out["post_log"] = [record.as_json(STATUS_FRAGMENTS) for record in records]
        return out

    def _reserve(self, post_id: int, size: int) -> None:
        others = self._reserved_total - self._reserved.get(post_id, 0)
        if others + size > self.memory_budget:
            self.memory_refusals += 1
            self._release(post_id)
            raise IngestOverloaded(
                f"this POST needs {size} bytes in memory and other POSTs hold {others}: over the ingest "
                f"memory budget of {self.memory_budget} bytes; retry later"
            )
        self._reserved[post_id] = size
        self._reserved_total = others + size

    def _release(self, post_id: int) -> None:
        self._reserved_total -= self._reserved.pop(post_id, 0)

    def _on_header(
        self, path: StreamPath, stream: _Stream, header: Header, group: str | None, now: float
    ) -> tuple[dict[int, _Track], list[str], bool]:
        """The tracks a POST with ``header`` writes to, notices, and whether the POST is a restart
        of its encoder (another header than its group's last one). Computes everything before it
        changes anything, so a header that fails half-way leaves the stream as it was."""
        digest = hashlib.sha256(header.data).digest()
        names = self.rules.track_names(header)
        files = set(stream.files)
        chosen: dict[int, _Track] = {}
        created: list[_Track] = []
        notices = []
        for track in header.tracks:
            init = self.rules.init_segment(track)
            definition = (track.track_id, hashlib.sha256(init).digest())
            known = stream.tracks.get(definition)
            if known is not None:
                chosen[track.track_id] = known
                continue
            earlier = [t for t in stream.all_tracks() if t.track_id == track.track_id]
            name = names.get(track.track_id, "")
            if not is_safe_name(name) or name.lower().endswith(".mp4"):
                name = f"track{track.track_id}"
            new = _new_track(path, files, track.track_id, name, earlier, track.timescale, init,
                             is_continuous(track.handler), definition)  # fmt: skip
            chosen[track.track_id] = new
            created.append(new)
            if earlier:
                old = earlier[-1]
                notices.append(f"ingest.track.redefined stream={path} track={track.track_id} "
                               f"old_file={'/'.join(old.file)} new_file={'/'.join(new.file)} "
                               f"timescale={old.timescale}->{track.timescale}")  # fmt: skip
        # Commit.
        if stream.header_digest is None:
            stream.header_digest = digest
        elif stream.header_digest != digest:
            stream.header_mismatches += 1
            self.tolerated["header_mismatch"] += 1
            if stream.mismatch_logged is None or now - stream.mismatch_logged >= MISMATCH_LOG_INTERVAL:
                notices.append(f"ingest.stream.header_mismatch stream={path} group={group} "
                               f"mismatches={stream.header_mismatches} "
                               f"not_logged_since={stream.mismatches_unlogged} "
                               f"note=\"the header differs from the stream's first; "
                               f"accepted (spec 7.5.c, 8.3)\"")  # fmt: skip
                stream.mismatch_logged, stream.mismatches_unlogged = now, 0
            else:
                stream.mismatches_unlogged += 1
        previous = stream.last_header.pop(group, None)
        restarted = self.detect_restarts and previous is not None and previous != digest
        stream.last_header[group] = digest
        if len(stream.last_header) > HEADERS_KEPT:
            del stream.last_header[next(iter(stream.last_header))]
        if restarted:
            stream.restarts += 1
            self.tolerated["encoder_restart"] += 1
            notices.append(f"ingest.stream.encoder_restarted stream={path} group={group} note=\"a new header "
                           f"from this encoder: a track whose time goes back starts a new file\"")  # fmt: skip
        for new in created:
            stream.tracks[new.definition] = new
        stream.files = files
        return chosen, notices, restarted

    def _new_timeline(self, path: StreamPath, stream: _Stream, old: _Track, init: bytes) -> _Track:
        """A restarted encoder's track whose time went back: a new file (``init``, then its
        fragments) with its own de-duplication index; the old timeline stays in /status."""
        earlier = [t for t in stream.all_tracks() if t.track_id == old.track_id]
        new = _new_track(path, stream.files, old.track_id, earlier[0].name, earlier, old.timescale, init,
                         old.continuous, old.definition)  # fmt: skip
        stream.retired.append(old)
        del stream.retired[:-RETIRED_KEPT]
        stream.tracks[old.definition] = new
        return new

    def _decide(
        self, record: _PostRecord, tracks: dict[int, _Track], checked: CheckedFragment
    ) -> list[_Pending | Decision]:
        """Decide about each traf. Everything that can fail (the per-track rebuild) runs before
        any counter changes; an archived decision is only pending until :meth:`Post.written`."""
        parsed = checked.fragment.parsed
        planned: list[tuple[_Track, FragmentInfo, tuple[ArchiveWrite, ...] | None]] = []
        for traf, info in zip(parsed.trafs, checked.tracks, strict=True):
            track = tracks[info.track_id]
            writes = None
            if checked.rejected is None and not (info.time is not None and track.seen(info.time)):
                data = _single_track_fragment(self.rules, parsed, traf, info)
                init = () if track.init_written else (ArchiveWrite(track.file, track.init, new_file=True),)
                writes = (*init, ArchiveWrite(track.file, data))
            planned.append((track, info, writes))
        out: list[_Pending | Decision] = []
        for track, info, writes in planned:
            track.received += 1
            if checked.rejected is not None:
                track.rejected += 1
                decision = Decision(record.id, record.stream, info, "rejected", checked.rejected)
            elif writes is None:
                track.duplicates += 1
                assert info.time is not None
                index, duration = track.by_time.get(info.time, (info.index, info.duration))  # forgotten: no check
                reason = None
                if (index, duration) != (info.index, info.duration):
                    track.conflicts += 1
                    reason = (
                        f"index {info.index}, duration {info.duration}; "
                        f"archived copy has index {index}, duration {duration}"
                    )
                decision = Decision(record.id, record.stream, info, "duplicate", reason, reason is not None,
                                    received=parsed.data)  # fmt: skip
            else:
                assert info.time is not None  # accepted fragments give their time
                decision = Decision(record.id, record.stream, info, "archived", writes=writes, received=parsed.data)
            record.fragments_seen += 1
            record.outcomes[decision.outcome] += 1
            record.fragments.append((info, decision.outcome))
            out.append(_Pending(decision, track, info.time) if writes is not None and info.time is not None
                       else decision)  # fmt: skip
        return out

    def _close(self, record: _PostRecord, now: float, status: PostStatus, reason: str | None) -> None:
        self._release(record.id)
        if record.status != "active":
            return
        record.ended, record.status, record.reason = now, status, reason
        self._active -= 1


def _new_track(path: StreamPath, files: set[str], track_id: int, name: str, earlier: list[_Track], timescale: int,
               init: bytes, continuous: bool, definition: tuple[int, bytes]) -> _Track:  # fmt: skip
    """A track file for ``track_id`` named after ``name`` (or after the first of ``earlier``
    definitions or timelines of it), not one of ``files``, which it joins."""
    if earlier:
        name = earlier[0].name
    stem, n = name, len(earlier) + 1
    while f"{stem}.mp4" in files:
        stem = f"{name}-{n}" if n > 1 else f"{name}-{track_id}"
        n += 1
    files.add(f"{stem}.mp4")
    key = str(track_id) if not earlier else f"{track_id}-{len(earlier) + 1}"
    return _Track(track_id, stem, (*path.point, path.stream_id, f"{stem}.mp4"), timescale, init, key=key,
                  continuous=continuous, definition=definition)  # fmt: skip


def _track_json(track: _Track) -> dict[str, Any]:
    return {
        "name": track.name,
        "file": "/".join(track.file),
        "timescale": track.timescale,
        "fragments_received": track.received,
        "fragments_archived": track.archived,
        "duplicates_dropped": track.duplicates,
        "conflicts": track.conflicts,
        "rejected": track.rejected,
        "gaps": track.gaps,
        "negative_times": track.negative_times,
        "first_index": track.first_index,
        "last_index": track.last_index,
        "last_timestamp": track.last_time,
    }


def _single_track_fragment(rules: ReceiverRules, parsed: ParsedFragment, traf: ParsedTraf, info: FragmentInfo) -> bytes:
    """The ``moof`` + ``mdat`` of one track of ``parsed``: the received bytes if it is the only
    track, else rebuilt by the format with the same index, time and samples."""
    if len(parsed.trafs) == 1:
        return parsed.data
    return rules.single_track_fragment(parsed, traf, FragmentTiming(info.index, info.time, info.duration))


class Post:
    """One POST to the publishing point: see the module docstring for the calling sequence."""

    def __init__(self, point: PublishingPoint, record: _PostRecord, stream: _Stream) -> None:
        self._point = point
        self._record = record
        self._stream = stream
        self._checker = PostChecker(point.rules)
        self._tracks: dict[int, _Track] = {}
        self._queue: deque[_Pending | Decision] = deque()
        self._unconfirmed: _Pending | None = None
        self._notices: list[str] = []
        self._restart_pending: set[int] = set()  # tracks whose first fragment decides on a new timeline

    @property
    def id(self) -> int:
        return self._record.id

    @property
    def path(self) -> StreamPath:
        return self._record.stream

    @property
    def encoder_group(self) -> str | None:
        return self._record.encoder_group

    @property
    def header(self) -> Header | None:
        """The stream header this POST opened with (None until it arrived)."""
        return self._checker.header

    @property
    def status(self) -> PostStatus:
        return self._record.status

    @property
    def outcomes(self) -> Counter[str]:
        """This POST's decisions so far by outcome (archived, duplicate, rejected), per traf."""
        return self._record.outcomes

    def feed(self, data: bytes) -> None:
        """Take bytes of the body. Raises IngestOverloaded if holding them (or the box they
        start) would exceed the publishing point's memory budget: the POST must end."""
        self._checker.feed(data)
        self._record.bytes_received += len(data)
        self._point._reserve(self._record.id, self._checker.reserved)

    def next_decision(self) -> Decision | NeedData:
        """The next decision, or NEED_DATA. Raises MediaError if the stream cannot go on; the
        publishing point is then unchanged by this POST's unfinished fragment."""
        if self._unconfirmed is not None:
            raise RuntimeError("the previous archived decision was neither confirmed (written) nor the POST closed")
        try:
            while not self._queue:
                event = self._checker.next_event()
                if event is NEED_DATA:
                    self._point._reserve(self._record.id, self._checker.reserved)
                    return NEED_DATA
                if isinstance(event, Header):
                    record = self._record
                    self._tracks, notices, restarted = self._point._on_header(
                        record.stream, self._stream, event, record.encoder_group, record.started
                    )
                    self._notices += notices
                    self._restart_pending = set(self._tracks) if restarted else set()
                else:
                    if self._restart_pending and event.rejected is None:
                        self._restart_timelines(event)
                    self._queue.extend(self._point._decide(self._record, self._tracks, event))
        except (MediaError, IngestOverloaded):
            raise
        except Exception as exc:  # a field no writer can carry, or a bug of ours: this POST only
            raise MediaError(f"cannot process this stream: {type(exc).__name__}: {exc}") from exc
        item = self._queue.popleft()
        if isinstance(item, _Pending):
            self._unconfirmed = item
            return item.decision
        return item

    def _restart_timelines(self, checked: CheckedFragment) -> None:
        """The first fragment of each track after a restart: a time at or before the track's last
        archived one starts a new timeline (a new file); a later time continues the old one."""
        header = self._checker.header
        assert header is not None
        for info in checked.tracks:
            if info.track_id not in self._restart_pending:
                continue
            self._restart_pending.discard(info.track_id)
            track = self._tracks[info.track_id]
            if info.time is None or track.last_time is None or info.time > track.last_time:
                continue
            (definition,) = (t for t in header.tracks if t.track_id == info.track_id)
            init = self._point.rules.init_segment(definition)
            new = self._point._new_timeline(self._record.stream, self._stream, track, init)
            self._tracks[info.track_id] = new
            self._notices.append(f"ingest.track.new_timeline stream={self._record.stream} track={info.track_id} "
                                 f"time={info.time} last_time={track.last_time} old_file={'/'.join(track.file)} "
                                 f"new_file={'/'.join(new.file)}")  # fmt: skip

    def written(self, decision: Decision) -> None:
        """The writes of ``decision`` (an archived one) succeeded: the fragment is archived now."""
        pending = self._unconfirmed
        if pending is None or pending.decision is not decision:
            raise RuntimeError("written() takes the archived decision just handed out")
        self._unconfirmed = None
        track, info = pending.track, decision.fragment
        track.archive(info.index, pending.time, info.duration)
        if pending.time < 0:  # read as signed: an encoder's priming (smooth.signed_time)
            track.negative_times += 1
            self._point.tolerated["negative_time"] += 1
            if track.negative_times == 1:
                self._notices.append(f"ingest.fragment.negative_time stream={self._record.stream} "
                                     f"track={info.track_id} time={pending.time} note=\"read as a signed time "
                                     f"(encoder priming): archived\"")  # fmt: skip
        if not track.init_written:
            track.init_written, track.init = True, b""

    def take_notices(self) -> list[str]:
        """Log lines about this POST's stream (a track redefined), once each."""
        notices, self._notices = self._notices, []
        return notices

    def end_of_body(self) -> None:
        """See :meth:`PostChecker.end_of_body`."""
        if self._unconfirmed is not None:
            raise RuntimeError("the last archived decision was not confirmed")
        self._checker.end_of_body()

    def close(self, now: float, status: PostStatus, reason: str | None = None) -> None:
        """Record how the POST ended (only the first call counts) and release its memory. An
        archived decision not confirmed by then is dropped: its fragment stays acceptable."""
        self._unconfirmed = None
        self._queue.clear()
        self._point._close(self._record, now, status, reason)
