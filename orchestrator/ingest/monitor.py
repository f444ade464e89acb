"""The ingest server's confidence monitor: what arrived from each encoder group, per stream and
track, side by side, with each group's picture of the same fragment index.

The server hands every decision of every POST to :meth:`IngestMonitor.decision` (archived and
duplicate fragments alike: the duplicates are the other group's copies, exactly what the page
compares). Per (stream, track, group) it counts what arrived (:class:`~orchestrator.ops.monitor.Arrivals`,
a few integers, always); the fragment bytes go to the :class:`~orchestrator.ops.thumbnails.Thumbnailer`,
which keeps and decodes them only while a page polls ``/monitor.json``. The rows are aligned by
the shelf (:mod:`orchestrator.ops.monitor`): the groups' tiles of one track show the same index.

Each track is decoded from its own single-track init segment (the format's, as archived) and the
fragment as received; a track of another kind than video or audio is counted, not decoded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from orchestrator.fmp4.reader import Header
from orchestrator.ingest.receiver import Decision, Post
from orchestrator.ops import monitorweb
from orchestrator.ops.httpserve import Scope, Send
from orchestrator.ops.monitor import Arrivals, Key, ingest_rows
from orchestrator.ops.thumbnails import Thumbnailer, find_ffmpeg
from orchestrator.wire.format import ReceiverRules

KINDS = {b"vide": "video", b"soun": "audio"}
DECODED = ("video", "audio")  # the kinds a tile has a picture or a level of
UNNAMED_GROUP = "(no X-Encoder-Group)"
MAX_ROWS = 4096  # (stream, track, group) counted at most: a bound whatever the clients send


class TrackTiles:
    """Per (stream, track, group), what arrived (:class:`~orchestrator.ops.monitor.Arrivals`, a
    few integers, always) and the thumbnailer fed with each video or audio fragment (kept only
    while a page is open); at most :data:`MAX_ROWS` tiles. Shared by the ingest's and the relay's
    monitors: both see single-track Smooth or CMAF fragments per track."""

    def __init__(self, thumbnailer: Thumbnailer) -> None:
        self.thumbnailer = thumbnailer
        self.arrivals: dict[Key, Arrivals] = {}

    def arrived(self, key: Key, kind: str, init_segment: Callable[[], bytes], *, index: int, media_ms: int | None,
                seconds: float, outcome: str, data: bytes) -> None:  # fmt: skip
        """One fragment of ``key``'s track (``data``: its bytes, or b"" for one not to decode);
        ``init_segment()`` is asked once, for the tile's first fragment. Never waits."""
        arrivals = self.arrivals.get(key)
        if arrivals is None:
            if len(self.arrivals) >= MAX_ROWS:
                return
            arrivals = self.arrivals[key] = Arrivals(kind)
            if kind in DECODED:
                self.thumbnailer.header(key, init_segment(), (kind,))
        arrivals.add(index, media_ms, seconds, outcome, trio.current_time())
        if kind in DECODED and data:
            self.thumbnailer.offer(key, index, kind, data)

    def rows(self) -> tuple[list[dict[str, Any]], float]:
        """The document's ``rows`` (this is a page poll: it renews the viewer lease) and the
        longest fragment duration seen (2 s before any)."""
        self.thumbnailer.watch()
        rows = ingest_rows(self.arrivals, self.thumbnailer.pictures, now=trio.current_time(),
                           thumb_url=monitorweb.thumb_url)  # fmt: skip
        seconds = [a.fragment_seconds for a in self.arrivals.values() if a.fragment_seconds]
        fragment_seconds = max(seconds) if seconds else 2.0
        self.thumbnailer.fragment_seconds = fragment_seconds
        return rows, fragment_seconds


class IngestMonitor:
    """See the module docstring. ``thumbnailer`` decodes (a default one with ffmpeg from PATH)."""

    def __init__(self, rules: ReceiverRules, thumbnailer: Thumbnailer | None = None) -> None:
        self.rules = rules
        self.tiles = TrackTiles(thumbnailer or Thumbnailer(find_ffmpeg(), fragment_seconds=2.0))
        self.thumbnailer = self.tiles.thumbnailer
        self.arrivals = self.tiles.arrivals
        self._headers: dict[int, tuple[Header, dict[int, tuple[str, str, int]]]] = {}  # post id -> tracks

    def decision(self, post: Post, decision: Decision) -> None:
        """Count one decision; offer its fragment to the thumbnailer. Never waits."""
        if decision.outcome == "rejected":
            return
        header = post.header
        if header is None:
            return
        tracks = self._tracks(post, header)
        info = decision.fragment
        entry = tracks.get(info.track_id)
        if entry is None:
            return
        name, kind, timescale = entry
        key: Key = ((f"{decision.stream.point_name}/{decision.stream.stream_id}", name),
                    post.encoder_group or UNNAMED_GROUP)  # fmt: skip

        def init_segment() -> bytes:
            return self.rules.init_segment(next(t for t in header.tracks if t.track_id == info.track_id))

        self.tiles.arrived(key, kind, init_segment, index=info.index,
                           media_ms=None if info.time is None else info.time * 1000 // timescale,
                           seconds=info.duration / timescale, outcome=decision.outcome,
                           data=decision.received)  # fmt: skip

    def _tracks(self, post: Post, header: Header) -> dict[int, tuple[str, str, int]]:
        known = self._headers.get(post.id)
        if known is not None and known[0] is header:
            return known[1]
        names = self.rules.track_names(header)
        tracks = {t.track_id: (names.get(t.track_id) or f"track{t.track_id}", KINDS.get(t.handler, t.handler.decode(
            "latin-1", "replace")), t.timescale) for t in header.tracks}  # fmt: skip
        self._headers[post.id] = (header, tracks)
        return tracks

    def post_ended(self, post: Post) -> None:
        self._headers.pop(post.id, None)

    def document(self) -> dict[str, Any]:
        rows, fragment_seconds = self.tiles.rows()
        return monitorweb.document("ingest", "", fragment_seconds, self.thumbnailer, time.time(), rows=rows, peers=[])

    async def serve(self, scope: Scope, send: Send) -> None:
        """Answer a monitor route (the caller checked :func:`monitorweb.is_monitor_path` and GET)."""
        path = scope["path"]
        if await monitorweb.serve_static(path, send):
            return
        if path == "/monitor.json":
            await monitorweb.answer(send, 200, "application/json", monitorweb.json_body(self.document()))
        elif path == "/monitor/thumb":
            await monitorweb.serve_thumb(scope, send, self.thumbnailer.pictures)
        else:
            await monitorweb.answer(send, 404, "text/plain", b"not a monitor route\n")
