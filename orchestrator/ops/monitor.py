"""The confidence monitor's core: who is watching, which fragments to keep and decode, what a
decoded picture says (frozen, black, silent, different from the other group), as pure data.

Theory of operation
-------------------
The monitor pages (``/monitor`` on ``up``'s ops listener and on ``orchestrator ingest``) show,
per stream (and, at the ingest, per track), one *tile* per encoder group: the group's latest
picture and audio level beside the other groups'. The shells (:mod:`orchestrator.ops.thumbnails`
for the decoding, :mod:`orchestrator.ops.listener` and the ingest server for the pages) feed this
module bytes, integers and ``now`` and do what it decides:

* :class:`ViewerLease`: pictures are decoded only while someone watches. Each poll of the page's
  JSON renews the lease for ``ttl`` seconds; once it lapses, nothing is kept or decoded, and the
  shell drops what it held. A process nobody watches pays one comparison per fragment.
* :class:`Shelf`: while watched, the fragments offered to the monitor (the stream header, and per
  fragment index the first video and the first audio track's ``moof`` + ``mdat``) are kept for
  the last :data:`KEEP` indices of each (row, group), within a byte budget (a tile over it gives
  up its own older indices first; what still does not fit is refused and counted). :meth:`Shelf.jobs`
  says what to decode now: each tile's newest complete index, never one already decoded or
  older, never two decodes of one (row, group) at once: at most one decode per (row, group)
  per fragment, fewer when decoding falls behind (the newest wins, and the tile served longest
  ago goes first, so every tile gets its turn).
* :func:`shown`: each tile keeps its last :data:`HISTORY` pictures, and the tiles of a row show
  the newest fragment index they all hold, so the pictures side by side are of the same
  fragment even when one group delivers a fragment later than the other.
* :func:`decode_argv`: the ffmpeg command of a batch of decodes (an argv list, never a shell
  string; one process for several tiles, since starting ffmpeg is most of the cost): per job,
  the first video frame of the fragment, i.e. its first keyframe, as a small PNG plus a
  :data:`GRID_WIDTH` x :data:`GRID_HEIGHT` grey grid, and the first second of its audio as mono
  16-bit PCM at 8 kHz.
* The rules, on what one decode gives (:class:`Picture`), cheap by design:
  *black*: the grid's mean luma is below :data:`BLACK_LUMA` (of 255; video-range black is 16);
  *frozen*: the picture equals the previous one decoded for the tile at a later index (mean
  absolute difference of the grids below :data:`SAME_PICTURE`): two fragments in a row with
  the same first keyframe; *silent*: the audio's RMS level is below :data:`SILENT_DBFS`;
  *differs*: two groups' pictures of the *same* index differ by more than :data:`DIFFERENT_PICTURE`
  (mean absolute difference of the grids); *stale*: nothing new from the group for more than
  :data:`STALE_FRAGMENTS` fragment durations (a stopped, killed or stalled encoder, or a group
  whose POSTs stopped arriving); *restarted*: the group's encoder failed (exited, was killed,
  stalled) within the last :data:`RECENT_FAILURE_FRAGMENTS` fragment durations, even if its
  restart already delivers again; *unreachable*: a peer's tiles, as last seen, when the peer
  stopped answering. :class:`TileJudge` keeps the state the frozen rule needs.

The grid is 32 x 18 luma samples: a thumbnail's worth of averaging removes the encoder's noise
(the same still picture encoded twice differs by well under one level there) while a test
pattern's moving box, a burnt-in clock or real motion move it by several.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

THUMB_WIDTH = 232  # pixels; the height follows the picture's aspect ratio (even)
GRID_WIDTH, GRID_HEIGHT = 32, 18
AUDIO_RATE = 8000  # Hz, mono: plenty for a level
AUDIO_SECONDS = 1  # of each fragment's audio
BLACK_LUMA = 24.0
SAME_PICTURE = 1.0  # mean absolute grid difference (levels) below which two pictures are the same
DIFFERENT_PICTURE = 12.0  # above which two groups' pictures of one index are not the same content
SILENT_DBFS = -60.0
FLOOR_DBFS = -120.0  # what digital silence reads as
STALE_FRAGMENTS = 1.5
RECENT_FAILURE_FRAGMENTS = 5  # an encoder that failed (and was restarted) this recently is marked
KEEP = 3  # fragment indices kept per (row, group) while watched
HISTORY = 4  # decoded pictures kept per tile, to show the groups' pictures of one index side by side
SHELF_BYTES = 96 * 1024 * 1024  # bytes of fragments kept over all rows and groups
LEASE_SECONDS = 5.0  # a page's poll renews the lease for this long, or three polls if longer

Row = tuple[str, ...]  # (stream,) on up; (stream, track) at the ingest
Key = tuple[Row, str]  # (row, group)


class ViewerLease:
    """Someone is watching until ``ttl`` seconds after the last :meth:`renew`."""

    def __init__(self, ttl: float = LEASE_SECONDS) -> None:
        self.ttl = ttl
        self._until: float | None = None

    def renew(self, now: float) -> None:
        self._until = now + self.ttl

    def watched(self, now: float) -> bool:
        return self._until is not None and now < self._until

    def lapsed(self, now: float) -> bool:
        """True once, when a lease that was held has run out (the shell then drops what it kept)."""
        if self._until is not None and now >= self._until:
            self._until = None
            return True
        return False


# --- what a decode gives, and the rules --------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    """One decode of fragment ``index`` of one (row, group)."""

    index: int
    png: bytes | None = field(default=None, repr=False)  # the thumbnail; None: no video
    grid: bytes | None = field(default=None, repr=False)  # GRID_WIDTH x GRID_HEIGHT luma
    level_dbfs: float | None = None  # the audio's RMS level; None: no audio
    frozen_since: int | None = None  # set by TileJudge.add: the first index of the same picture, if repeated

    @property
    def luma(self) -> float | None:
        return mean_luma(self.grid) if self.grid else None

    def marks(self) -> list[str]:
        """This picture's marks (frozen, black, silent): a tile's marks are those of the
        picture it shows."""
        marks = []
        if self.frozen_since is not None:
            marks.append("frozen")
        luma = self.luma
        if luma is not None and luma < BLACK_LUMA:
            marks.append("black")
        if self.level_dbfs is not None and self.level_dbfs < SILENT_DBFS:
            marks.append("silent")
        return marks


def mean_luma(grid: bytes) -> float:
    return sum(grid) / len(grid)


def mean_abs_diff(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two grids of the same size (levels, 0 to 255)."""
    if len(a) != len(b) or not a:
        return 255.0
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def rms_dbfs(pcm: bytes) -> float | None:
    """The RMS level of signed 16-bit little-endian PCM, in dB below full scale (a full-scale
    sine reads -3 dBFS); digital silence reads :data:`FLOOR_DBFS`; None for no samples."""
    count = len(pcm) // 2
    if count == 0:
        return None
    samples = struct.unpack(f"<{count}h", pcm[: count * 2])
    mean_square = sum(s * s for s in samples) / count
    if mean_square == 0:
        return FLOOR_DBFS
    return max(FLOOR_DBFS, 10 * math.log10(mean_square / 32768.0**2))


@dataclass
class TileJudge:
    """The marks of one tile's pictures; :meth:`add` takes each new decode in index order and
    keeps the last :data:`HISTORY` (so tiles side by side can show one index, see :func:`shown`)."""

    last: Picture | None = None
    frozen_since: int | None = None  # the first index of the picture that repeats
    history: list[Picture] = field(default_factory=list, repr=False)

    def picture(self, index: int) -> Picture | None:
        return next((p for p in self.history if p.index == index), None)

    def add(self, picture: Picture) -> Picture:
        """Judge ``picture`` against the one before; returns it with its ``frozen_since`` set."""
        previous = self.last
        if previous is not None and picture.index <= previous.index:
            return previous  # older than what is shown: never go back
        if previous is not None and previous.grid and picture.grid and \
                mean_abs_diff(previous.grid, picture.grid) < SAME_PICTURE:  # fmt: skip
            if self.frozen_since is None:
                self.frozen_since = previous.index
        else:
            self.frozen_since = None
        picture = replace(picture, frozen_since=self.frozen_since)
        self.history = [*self.history[-(HISTORY - 1) :], picture]
        self.last = picture
        return picture

    def marks(self) -> list[str]:
        return [] if self.last is None else self.last.marks()


def shown(pictures: dict[Key, tuple[Picture, TileJudge]]) -> dict[Key, Picture]:
    """The picture each tile shows: per row, the tiles whose newest picture is within two
    indices of the row's newest show the newest index all of them still hold (so the pictures
    side by side are of the same fragment, whichever group delivers later); the others, and
    rows without such an index, their newest."""
    out = {key: picture for key, (picture, _) in pictures.items()}
    rows: dict[Row, list[Key]] = {}
    for key in pictures:
        rows.setdefault(key[0], []).append(key)
    for keys in rows.values():
        newest = max(pictures[k][0].index for k in keys)
        current = [k for k in keys if pictures[k][0].index >= newest - 2]
        common = set.intersection(*({p.index for p in pictures[k][1].history} for k in current))
        if len(current) > 1 and common:
            index = max(common)
            for k in current:
                out[k] = pictures[k][1].picture(index) or out[k]
    return out


def differs(pictures: Iterable[Picture]) -> bool:
    """True if two of ``pictures`` show the same index with different content."""
    by_index: dict[int, list[bytes]] = {}
    for p in pictures:
        if p.grid:
            by_index.setdefault(p.index, []).append(p.grid)
    for grids in by_index.values():
        for other in grids[1:]:
            if mean_abs_diff(grids[0], other) > DIFFERENT_PICTURE:
                return True
    return False


def is_stale(age_seconds: float | None, fragment_seconds: float) -> bool:
    """Nothing new for more than :data:`STALE_FRAGMENTS` fragment durations (None: never anything)."""
    return age_seconds is None or age_seconds > STALE_FRAGMENTS * fragment_seconds


# --- what is kept while watched, and what to decode -----------------------------------------------


@dataclass(frozen=True)
class Job:
    """Decode fragment ``index`` of ``key``: ``header`` + ``video`` and ``header`` + ``audio``."""

    key: Key
    index: int
    header: bytes = field(repr=False)
    video: bytes | None = field(default=None, repr=False)
    audio: bytes | None = field(default=None, repr=False)

    @property
    def video_data(self) -> bytes:
        return self.header + (self.video or b"")

    @property
    def audio_data(self) -> bytes:
        return self.header + (self.audio or b"")


@dataclass
class _Kept:
    header: bytes = b""
    kinds: frozenset[str] = frozenset()  # the kinds a complete index has: "video", "audio"
    parts: dict[int, dict[str, bytes]] = field(default_factory=dict)  # index -> kind -> bytes

    def size(self) -> int:
        return sum(len(b) for p in self.parts.values() for b in p.values())

    def complete(self) -> list[int]:
        return sorted(i for i, p in self.parts.items() if self.kinds <= p.keys())


class Shelf:
    """The fragments kept while watched, and the decode decisions. See the module docstring."""

    def __init__(self, budget: int = SHELF_BYTES, keep: int = KEEP) -> None:
        self.budget = budget
        self.keep = keep
        self.size = 0
        self.refused = 0  # fragments not kept: the budget was used up
        self._kept: dict[Key, _Kept] = {}
        self._decoded: dict[Key, int] = {}  # the newest index decoded (or being decoded)
        self._busy: set[Key] = set()
        self._served: dict[Key, int] = {}  # the turn at which each tile's last decode started
        self._turn = 0

    def clear(self) -> None:
        """Drop every fragment kept (the headers stay: a stream sends its header once)."""
        for kept in self._kept.values():
            kept.parts.clear()
        self._decoded.clear()
        self.size = 0

    def header(self, key: Key, data: bytes, kinds: Iterable[str]) -> None:
        """The stream header of ``key`` and the kinds (video, audio) a decodable index needs."""
        kept = self._kept.setdefault(key, _Kept())
        if kept.header != data:
            self.size -= kept.size()
            kept.header, kept.kinds, kept.parts = data, frozenset(kinds), {}

    def offer(self, key: Key, index: int, kind: str, data: bytes) -> None:
        """Fragment ``index`` of ``key``'s first track of ``kind``; kept if wanted and within budget."""
        kept = self._kept.get(key)
        if kept is None or kind not in kept.kinds:
            return
        if index <= self._decoded.get(key, -1) or (kept.parts and index < min(kept.parts)):
            return
        part = kept.parts.setdefault(index, {})
        if kind in part:
            return
        while len(kept.parts) > self.keep or (self.size + len(data) > self.budget and min(kept.parts) < index):
            self.size -= sum(len(b) for b in kept.parts.pop(min(kept.parts)).values())  # this tile's oldest first
        if self.size + len(data) > self.budget:
            self.refused += 1
            if not part:
                del kept.parts[index]
            return
        part[kind] = data
        self.size += len(data)

    def jobs(self, limit: int) -> list[Job]:
        """At most ``limit`` decodes to start now: idle tiles with a complete index newer than
        the last they decoded, the tile served longest ago first (so with fewer decodes than
        tiles, every tile still gets its turn), each its newest such index. Each job marks its
        tile busy until :meth:`done`."""
        ready = []
        for key, kept in self._kept.items():
            complete = kept.complete()
            if key not in self._busy and complete and complete[-1] > self._decoded.get(key, -1):
                ready.append((self._served.get(key, -1), key, complete[-1]))
        out = []
        for _, key, index in sorted(ready, key=lambda r: r[0])[:limit]:
            kept = self._kept[key]
            part = kept.parts[index]
            out.append(Job(key, index, kept.header, part.get("video"), part.get("audio")))
            self._busy.add(key)
            self._decoded[key] = index
            self._turn += 1
            self._served[key] = self._turn
        return out

    def done(self, job: Job) -> None:
        """The decode of ``job`` ended (either way): its key may be decoded again."""
        self._busy.discard(job.key)
        kept = self._kept.get(job.key)
        if kept is not None:  # what is older than the decoded index is never decoded: let it go
            for index in [i for i in kept.parts if i <= job.index]:
                self.size -= sum(len(b) for b in kept.parts.pop(index).values())


@dataclass(frozen=True)
class Outputs:
    """Where one job's inputs are and its outputs go (files in the decoder's private directory)."""

    video_source: str  # header + video fragment
    audio_source: str  # header + audio fragment
    thumbnail: str
    grid: str
    pcm: str


def decode_argv(ffmpeg: str, batch: Sequence[tuple[Job, Outputs]], kind: str) -> list[str] | None:
    """One ffmpeg command that decodes the ``kind`` (video or audio) of every job of ``batch``
    that has it (one input each, its outputs beside): one process start for several tiles, which
    is most of a decode's cost. Video and audio go to separate processes: with both in one,
    ffmpeg 5.1 went on decoding every video frame of each input until the audio was done (three
    times the CPU). None if no job has ``kind``."""
    chosen = [(job, out) for job, out in batch if (job.video if kind == "video" else job.audio) is not None]
    if not chosen:
        return None
    argv = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1", "-filter_threads", "1"]
    for _, out in chosen:
        argv += ["-f", "mp4", "-i", out.video_source] if kind == "video" else \
            ["-t", str(AUDIO_SECONDS), "-f", "mp4", "-i", out.audio_source]  # fmt: skip
    argv.append("-y")
    if kind == "video":
        grid = f"scale={GRID_WIDTH}:{GRID_HEIGHT},format=gray"
        argv += ["-filter_complex", ";".join(f"[{i}:v:0]scale={THUMB_WIDTH}:-2,split=2[t{i}][s{i}];[s{i}]{grid}[g{i}]"
                                             for i in range(len(chosen)))]  # fmt: skip
    for i, (_, out) in enumerate(chosen):
        if kind == "video":
            argv += ["-map", f"[t{i}]", "-frames:v", "1", "-c:v", "png", "-f", "image2", out.thumbnail,
                     "-map", f"[g{i}]", "-frames:v", "1", "-f", "rawvideo", out.grid]  # fmt: skip
        else:
            argv += ["-map", f"{i}:a:0", "-ac", "1", "-ar", str(AUDIO_RATE), "-f", "s16le", out.pcm]
    return argv


# --- the pages' JSON ---------------------------------------------------------------------------------


def clock_time_ms(epoch_ns: int, fragment_ns: tuple[int, int], index: int) -> int:
    """The shared-clock start of fragment ``index`` in Unix milliseconds (exact in a JavaScript
    number, nanoseconds are not): epoch + index x D, with D = num/den nanoseconds."""
    num, den = fragment_ns
    return (epoch_ns + index * num // den) // 1_000_000


def poll_seconds(fragment_seconds: float) -> float:
    """How often the page polls: twice per fragment, at most once a second, at least every 3 s."""
    return min(3.0, max(1.0, fragment_seconds / 2))


def picture_json(picture: Picture | None, url: str | None) -> dict[str, Any] | None:
    if picture is None:
        return None
    luma = picture.luma
    return {
        "index": picture.index,
        "url": url if picture.png else None,
        "luma": None if luma is None else round(luma, 1),
        "level_dbfs": None if picture.level_dbfs is None else round(picture.level_dbfs, 1),
        "frozen_since": picture.frozen_since,
    }


def up_tiles(status: dict[str, Any], pictures: dict[Key, tuple[Picture, TileJudge]], *, ages: dict[Key, float | None],
             epoch_ns: int, fragment_ns: tuple[int, int], thumb_url: Any) -> list[dict[str, Any]]:  # fmt: skip
    """The ``streams`` of ``up``'s monitor document: the ``/status`` document's streams with, per
    group, its picture, marks and the shared-clock time of its last index. ``thumb_url(key, index)``
    names a thumbnail."""
    fragment_seconds = float(status["fragment_duration"]) or 1.0
    showing = shown(pictures)
    streams = []
    for stream in status["streams"]:
        row: Row = (stream["stream"],)
        tiles = []
        for g in stream["groups"]:
            key: Key = (row, g["group"])
            group = status["groups"].get(g["group"], {})
            picture = showing.get(key)
            age = ages.get(key)
            marks = [] if picture is None else picture.marks()
            failed_at = group.get("last_error_at")
            if failed_at is not None and status["time"] - failed_at < RECENT_FAILURE_FRAGMENTS * fragment_seconds:
                marks.insert(0, "restarted")
            if not group.get("encoder_up", False):
                marks.insert(0, "down")
            if is_stale(age, fragment_seconds):
                marks.insert(0, "stale")
            if g["endpoints"] and not any(e["state"] == "streaming" for e in g["endpoints"]):
                marks.append("not streaming")
            last = g["last_index"]
            tiles.append({
                "group": g["group"],
                "where": "here",
                "encoder_up": group.get("encoder_up", False),
                "restarts": group.get("restarts", 0),
                "last_error": group.get("last_error"),
                "last_error_at": group.get("last_error_at"),
                "last_index": last,
                "clock_time_ms": None if last is None else clock_time_ms(epoch_ns, fragment_ns, last),
                "age_seconds": None if age is None else round(age, 2),
                "lock": g["lock"],
                "content_offset_seconds": g["content_offset_seconds"],
                "endpoints": [{"endpoint": e["endpoint"], "region": e["region"], "state": e["state"]}
                              for e in g["endpoints"]],
                "picture": picture_json(picture, thumb_url(key, picture.index) if picture else None),
                "marks": marks,
            })  # fmt: skip
        streams.append({"stream": stream["stream"], "tiles": tiles,
                        "differs": differs(p for (r, _), p in showing.items() if r == row)})  # fmt: skip
    return streams


def merge_peer(streams: list[dict[str, Any]], peer: dict[str, Any], name: str, rewrite: Any, *,
               unreachable: bool = False) -> None:  # fmt: skip
    """Add a peer's tiles (from its own ``/monitor.json``) to ``streams``, marked with where they
    come from (``name``); ``rewrite(url)`` turns the peer's thumbnail URL into ours (a proxy).
    ``unreachable``: ``peer`` is the last document of a peer that no longer answers: every tile
    is marked so."""
    by_id = {s["stream"]: s for s in streams}
    for stream in peer.get("streams", []):
        if not isinstance(stream, dict) or not isinstance(stream.get("stream"), str):
            continue
        ours = by_id.get(stream["stream"])
        if ours is None:
            ours = by_id[stream["stream"]] = {"stream": stream["stream"], "tiles": [], "differs": False}
            streams.append(ours)
        for tile in stream.get("tiles", []):
            if not isinstance(tile, dict) or tile.get("where") != "here":
                continue  # the peer's own peers are its business: no loops, no duplicates
            tile = dict(tile, where=name)
            marks = [m for m in tile.get("marks", []) if isinstance(m, str)]
            tile["marks"] = ["unreachable", *marks] if unreachable else marks
            picture = tile.get("picture")
            if isinstance(picture, dict):  # a gone peer's thumbnails cannot be fetched: none shown
                tile["picture"] = dict(picture, url=None if unreachable else rewrite(picture.get("url")))
            ours["tiles"].append(tile)
        ours["differs"] = bool(ours["differs"] or stream.get("differs"))


@dataclass
class Arrivals:
    """What arrived from one group for one (stream, track) at the ingest, counted always (cheap)."""

    kind: str  # video, audio, or the handler of another track kind
    fragment_seconds: float = 0.0
    last_index: int | None = None
    last_seen: float | None = None  # monotonic
    media_ms: int | None = None  # the newest fragment's media time (ms since the presentation's epoch)
    outcomes: dict[str, int] = field(default_factory=dict)  # archived / duplicate / rejected -> count

    def add(self, index: int, media_ms: int | None, seconds: float, outcome: str, now: float) -> None:
        if self.last_index is None or index >= self.last_index:
            self.last_index, self.media_ms = index, media_ms
        self.last_seen = now
        self.fragment_seconds = seconds or self.fragment_seconds
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def ingest_rows(arrivals: dict[Key, Arrivals], pictures: dict[Key, tuple[Picture, TileJudge]], *, now: float,
                thumb_url: Any) -> list[dict[str, Any]]:  # fmt: skip
    """The ``rows`` of the ingest's monitor document: per (stream, track), a tile per group."""
    rows: dict[Row, list[Key]] = {}
    for key in arrivals:
        rows.setdefault(key[0], []).append(key)
    showing = shown(pictures)
    out = []
    for row in sorted(rows):
        tiles = []
        for key in sorted(rows[row], key=lambda k: k[1]):
            a = arrivals[key]
            picture = showing.get(key)
            age = None if a.last_seen is None else now - a.last_seen
            marks = [] if picture is None else picture.marks()
            if is_stale(age, a.fragment_seconds or 2.0):
                marks.insert(0, "stale")
            tiles.append({
                "group": key[1],
                "last_index": a.last_index,
                "media_ms": a.media_ms,
                "age_seconds": None if age is None else round(age, 2),
                "outcomes": dict(sorted(a.outcomes.items())),
                "picture": picture_json(picture, thumb_url(key, picture.index) if picture else None),
                "marks": marks,
            })  # fmt: skip
        kind = arrivals[rows[row][0]].kind
        out.append({"stream": row[0], "track": row[1] if len(row) > 1 else "", "kind": kind, "tiles": tiles,
                    "differs": differs(p for (r, _), p in showing.items() if r == row)})  # fmt: skip
    return out
