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
from typing import Any

import trio

from orchestrator.fmp4.reader import Header
from orchestrator.ingest.receiver import Decision, Post
from orchestrator.ops import monitorweb
from orchestrator.ops.httpserve import Scope, Send
from orchestrator.ops.monitor import Arrivals, Key, ingest_rows, poll_seconds
from orchestrator.ops.thumbnails import Thumbnailer, find_ffmpeg
from orchestrator.wire.format import ReceiverRules

KINDS = {b"vide": "video", b"soun": "audio"}
UNNAMED_GROUP = "(no X-Encoder-Group)"
MAX_ROWS = 4096  # (stream, track, group) counted at most: a bound whatever the clients send


class IngestMonitor:
    """See the module docstring. ``thumbnailer`` decodes (a default one with ffmpeg from PATH)."""

    def __init__(self, rules: ReceiverRules, thumbnailer: Thumbnailer | None = None) -> None:
        self.rules = rules
        self.thumbnailer = thumbnailer or Thumbnailer(find_ffmpeg(), fragment_seconds=2.0)
        self.arrivals: dict[Key, Arrivals] = {}
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
        arrivals = self.arrivals.get(key)
        if arrivals is None:
            if len(self.arrivals) >= MAX_ROWS:
                return
            arrivals = self.arrivals[key] = Arrivals(kind)
            if kind in ("video", "audio"):
                track = next(t for t in header.tracks if t.track_id == info.track_id)
                self.thumbnailer.header(key, self.rules.init_segment(track), (kind,))
        media_ms = None if info.time is None else info.time * 1000 // timescale
        arrivals.add(info.index, media_ms, info.duration / timescale, decision.outcome, trio.current_time())
        if kind in ("video", "audio") and decision.received:
            self.thumbnailer.offer(key, info.index, kind, decision.received)

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
        self.thumbnailer.watch()
        now = trio.current_time()
        rows = ingest_rows(self.arrivals, self.thumbnailer.pictures, now=now, thumb_url=monitorweb.thumb_url)
        seconds = [a.fragment_seconds for a in self.arrivals.values() if a.fragment_seconds]
        fragment_seconds = max(seconds) if seconds else 2.0
        self.thumbnailer.fragment_seconds = fragment_seconds
        return {
            "kind": "ingest",
            "presentation": "",
            "fragment_duration": fragment_seconds,
            "poll_seconds": poll_seconds(fragment_seconds),
            "time": round(time.time(), 3),
            "decoding": self.thumbnailer.ffmpeg is not None,
            "decodes": self.thumbnailer.counts.as_json(),
            "rows": rows,
            "peers": [],
        }

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
