"""The relay's confidence monitor: per stream and track, what arrived from the encoder (latest
fragment index, media time, the picture of its latest keyframe), and per outbound endpoint its
state (streaming, reconnecting, its backlog, its last error).

It is served on the relay's metrics listener beside ``/status`` (:func:`orchestrator.ops.listener.serve_listener`:
the same bind, the same read-only GET and HEAD), by the same page as ``up``'s and the ingest's
(:mod:`orchestrator.ops.monitorweb`, ``orchestrator/ops/static``): the document is of kind
``relay`` and has ingest-style ``rows`` (one per stream and track; the relay's group is the one
tile), each tile carrying the stream's ``endpoints``. A stream of the profile from which nothing
arrived yet still has a row (no track yet), so the endpoints' states show from the start.

:class:`RelayMonitor` is fed by :class:`~orchestrator.relay.server.RelayApp`: every header it
announces (:meth:`RelayMonitor.header`; the header's own single-track init segments are what the
decoder reads) and every fragment forwarded or dropped. Counting is a few integers; the bytes
go to the :class:`~orchestrator.ops.thumbnails.Thumbnailer`, which keeps and decodes them only
while a page polls ``/monitor.json`` (at most one decode per tile and fragment, bounded memory).
"""

from __future__ import annotations

import time
from typing import Any

import trio

from orchestrator.errors import MediaError
from orchestrator.fmp4.reader import Header
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.ingest.monitor import KINDS, TrackTiles
from orchestrator.ops import monitorweb
from orchestrator.ops.monitor import Key
from orchestrator.ops.state import LiveState
from orchestrator.ops.status import status_document
from orchestrator.ops.thumbnails import Thumbnailer
from orchestrator.wire import smooth

ENDPOINT_FIELDS = ("endpoint", "region", "state", "backlog_fragments", "backlog_bytes", "backlog_seconds",
                   "retry_in_seconds", "reconnects", "last_error", "last_error_at")  # fmt: skip


class RelayMonitor:
    """See the module docstring. ``live``: the relay's state (its endpoints, as ``/status`` shows them)."""

    peers: monitorweb.Peers | None = None  # a relay shows its own tiles only

    def __init__(self, live: LiveState, thumbnailer: Thumbnailer, *, group: str, streams: list[str]) -> None:
        self.live = live
        self.thumbnailer = thumbnailer
        self.group = group
        self.streams = streams
        self.tiles = TrackTiles(thumbnailer)
        self._tracks: dict[str, dict[int, tuple[str, str, bytes]]] = {}  # stream -> track ID -> name, kind, init

    def header(self, header: StreamHeader) -> None:
        """The stream's (new) header: its track names and kinds, and each track's init segment
        for the decoder (a tile seen before gets the new one: the encoder restarted)."""
        names = _track_names(header.data)
        tracks = {}
        for track in header.tracks:
            name = names.get(track.track_id) or f"track{track.track_id}"
            kind = KINDS.get(track.handler, track.handler.decode("latin-1", "replace"))
            init = smooth.RECEIVER.init_segment(track)
            tracks[track.track_id] = (name, kind, init)
            key = self._key(header.stream_id, name)
            if key in self.tiles.arrivals and kind in ("video", "audio"):
                self.thumbnailer.header(key, init, (kind,))
        self._tracks[header.stream_id] = tracks

    def fragment(self, fragment: EncodedFragment) -> None:
        """A fragment read from the encoder and forwarded. Never waits."""
        entry = self._tracks.get(fragment.stream_id, {}).get(fragment.track_id)
        if entry is None:
            return
        name, kind, init = entry
        self.tiles.arrived(self._key(fragment.stream_id, name), kind, lambda: init, index=fragment.index,
                           media_ms=fragment.start * 1000 // fragment.timescale,
                           seconds=fragment.duration / fragment.timescale, outcome="forwarded",
                           data=fragment.data)  # fmt: skip

    def dropped(self, stream_id: str, track_id: int, reason: str) -> None:
        """A fragment read and not forwarded (a duplicate, a rejected one): counted on its tile."""
        entry = self._tracks.get(stream_id, {}).get(track_id)
        arrivals = None if entry is None else self.tiles.arrivals.get(self._key(stream_id, entry[0]))
        if arrivals is not None:
            arrivals.outcomes[reason] = arrivals.outcomes.get(reason, 0) + 1

    def _key(self, stream_id: str, track: str) -> Key:
        return (stream_id, track), self.group

    async def document(self, *, with_peers: bool = True) -> dict[str, Any]:
        """The ``/monitor.json`` document (a poll: it renews the viewer lease)."""
        rows, _ = self.tiles.rows()
        now_wall = time.time()
        status = status_document(self.live, now_wall=now_wall, now_monotonic=trio.current_time())
        endpoints = {s["stream"]: [{k: e[k] for k in ENDPOINT_FIELDS} for g in s["groups"] for e in g["endpoints"]]
                     for s in status["streams"]}  # fmt: skip
        shown = {row["stream"] for row in rows}
        for stream in self.streams:
            if stream not in shown:  # nothing from the encoder yet: the endpoints still show
                rows.append({"stream": stream, "track": "", "kind": "", "differs": False, "tiles": [{
                    "group": self.group, "last_index": None, "media_ms": None, "age_seconds": None, "outcomes": {},
                    "picture": None, "marks": ["stale"]}]})  # fmt: skip
        for row in rows:
            for tile in row["tiles"]:
                tile["endpoints"] = endpoints.get(row["stream"], [])
                states = {e["state"] for e in tile["endpoints"]}
                if states and "streaming" not in states:
                    tile["marks"].append("not streaming")  # as on up's page: no endpoint has the stream now
                elif states - {"streaming", "waiting"}:
                    tile["marks"].append("endpoint down")  # one has it, another fails: its backlog grows
        fragment_seconds = float(self.live.fragment_duration)
        return monitorweb.document("relay", self.live.presentation, fragment_seconds, self.thumbnailer, now_wall,
                                   rows=rows, peers=[])  # fmt: skip


def _track_names(data: bytes) -> dict[int, str]:
    """Track ID -> name from the header's Live Server Manifest (none for a header without one, or
    with a manifest the format refuses to read: the tiles are then named track<ID>)."""
    reader = smooth.reader()
    reader.feed(data)
    try:
        parsed = reader.next_event()
        return smooth.track_names(parsed.manifest_text) if isinstance(parsed, Header) else {}
    except MediaError:
        return {}
