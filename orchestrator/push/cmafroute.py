"""CMAF ingest endpoints on the push side: one publisher per (group, stream, track, endpoint).

Theory of operation
-------------------
The encoders and the fan-out speak Smooth: one header per stream (ftyp, Live Server Manifest,
moov) and one fragment per track and index (:mod:`orchestrator.fmp4.stream`). A CMAF endpoint
takes each *track* on a path of its own, a CMAF header per track, one segment per request
(:mod:`orchestrator.wire.cmaf`). This module puts the two together without touching either:

* :class:`Reboxer`, one per (group, stream): re-boxes the stream's header into one CMAF header
  per track, once per header version, and each fragment into a CMAF segment, once per fragment
  (the fan-out hands the same fragment object to every route in turn; the last result is
  kept), so a stream with several CMAF endpoints pays one re-boxing per fragment;
* :class:`TrackOutbox`, the route of one (track, endpoint): an :class:`EndpointOutbox` that
  takes the track's fragments only, re-boxed: the catch-up backlog, the forward buffer and
  the resend rules of :mod:`orchestrator.push.outbox` hold as for Smooth, per track; when the
  stream ends it sends the track's newest segment once more, labelled ``lmsg``;
* :class:`TrackHeaderBoard`: the track's CMAF header, read from the stream's board;
* :func:`add_cmaf_publishers`: the publishers of one (group, stream, endpoint), one per track,
  each with the format's request plan: its header alone to the header URL first and after any
  failure (a 412 "missing or bad init" included), then one request per segment to the
  segment's URL.

Why one publisher per track, not one per stream with per-track state: the spec asks for a
connection per track (Interface-1 8), a failure on one track's path (a 412 for its header, a
stalled upload) must resend that track's header and rewind that track's segments only, and a
slow track must not hold the others back; with a publisher per track all of this is the
existing lifecycle and outbox, unchanged (one header flag, one backlog), and each publisher's
one kept connection is the track's persistent connection (see
:mod:`orchestrator.push.lifecycle`, keep-alive). The cost: tracks x
publishers, and the publisher's ``stream`` label is the CMAF stream name ``<stream>-<track>``
(what the Streams() path names) so that two tracks of a stream do not share metric series.

Cancellation: nothing here runs a task; the publishers are run by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import trio

from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint
from orchestrator.push.fanout import FanOut
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import IdleSweeper, Publisher, PublisherSettings, Signer
from orchestrator.push.transport import Transport
from orchestrator.tracks import TrackDescription
from orchestrator.wire import cmaf

log = logging.getLogger(__name__)


class Reboxer:
    """One stream's Smooth header and fragments as CMAF (see the module docstring)."""

    def __init__(self, epoch_ns: int) -> None:
        self.segmenter = cmaf.Segmenter(epoch_ns)
        self._header: StreamHeader | None = None
        self._tracks: dict[int, tuple[TrackDescription, StreamHeader]] = {}
        self._last: tuple[EncodedFragment, EncodedFragment] | None = None

    def track_header(self, header: StreamHeader, track_id: int) -> StreamHeader:
        """Track ``track_id``'s CMAF header, from the stream's (Smooth) ``header``."""
        if header is not self._header:
            self._tracks = self.segmenter.track_headers(header)
            self._header = header
        return self._tracks[track_id][1]

    def segment(self, fragment: EncodedFragment) -> EncodedFragment:
        """``fragment`` with its bytes re-boxed as a CMAF segment (same index, times, track)."""
        if self._last is not None and self._last[0] is fragment:
            return self._last[1]
        data = self.segmenter.segment(fragment)
        out = EncodedFragment(fragment.stream_id, fragment.track_id, fragment.index, fragment.start, fragment.duration,
                              fragment.timescale, data, fragment.continuous)  # fmt: skip
        self._last = (fragment, out)
        return out


class TrackOutbox(EndpointOutbox):
    """The outbox of one (track, endpoint): the track's fragments only, as CMAF segments."""

    def __init__(self, limits: OutboxLimits, track_id: int, reboxer: Reboxer) -> None:
        super().__init__(limits)
        self.track_id = track_id
        self.reboxer = reboxer
        self._newest: EncodedFragment | None = None

    def push(self, fragment: EncodedFragment) -> list[EncodedFragment]:
        if fragment.track_id != self.track_id:
            return []
        self._newest = self.reboxer.segment(fragment)
        return super().push(self._newest)

    def close(self) -> None:
        """End the track: its newest segment goes (again) with ``lmsg`` (ingest spec
        Interface-1 18: the receiver then expects no more), then the outbox closes. The
        segment may already have been sent: a receiver drops the copy as a duplicate."""
        if self._newest is not None and not self.outbox.closed:
            super().push(dataclasses.replace(self._newest, data=cmaf.mark_last(self._newest.data)))
        super().close()


class TrackHeaderBoard(HeaderBoard):
    """One track's CMAF header, as the stream's board last announced the stream's header."""

    def __init__(self, board: HeaderBoard, track_id: int, reboxer: Reboxer) -> None:
        super().__init__(board.group, board.stream_id)
        self.board = board
        self.track_id = track_id
        self.reboxer = reboxer

    async def wait(self) -> StreamHeader:
        header = await self.board.wait()
        self.announce(self.reboxer.track_header(header, self.track_id))  # a new version only if it changed
        assert self.header is not None
        return self.header


def add_cmaf_publishers(
    fanout: FanOut,
    board: HeaderBoard,
    tracks: list[tuple[int, str]],
    endpoint: Endpoint,
    *,
    reboxer: Reboxer,
    limits: OutboxLimits,
    metrics: Metrics,
    settings: PublisherSettings,
    connector: Transport | None = None,
    authorization: str | None = None,
    connect_slots: trio.CapacityLimiter | None = None,
    idle_sweeper: IdleSweeper | None = None,
    signer: Signer | None = None,
) -> list[Publisher]:
    """One publisher per track (``tracks``: (track ID, name)) of ``board``'s stream to the CMAF
    ``endpoint``, each with its route in ``fanout``; with ``signer``, each request is signed
    (the endpoint's SigV4: one signer, so one credentials file watched, for all its tracks). The
    caller runs them."""
    paths = cmaf.PATH_SCHEMES[endpoint.cmaf_paths]
    stream_id = board.stream_id
    publishers = []
    for track_id, name in tracks:
        outbox = TrackOutbox(limits, track_id, reboxer)
        publisher = Publisher(
            group=fanout.group, stream_id=f"{stream_id}-{name}", endpoint=endpoint,
            header=TrackHeaderBoard(board, track_id, reboxer), outbox=outbox, metrics=metrics, settings=settings,
            connector=connector, authorization=authorization, connect_slots=connect_slots, idle_sweeper=idle_sweeper,
            plan=paths.plan, url=paths.header_url(endpoint.url, stream_id, name),
            segment_url=functools.partial(_segment_url, paths, endpoint.url, stream_id, name),
            signer=signer)  # fmt: skip
        fanout.add_route(stream_id, outbox, publisher.state, publisher.labels)
        publishers.append(publisher)
    return publishers


def _segment_url(paths: cmaf.Paths, base: str, stream_id: str, track: str, fragment: EncodedFragment) -> str:
    return paths.segment_url(base, stream_id, track, fragment.index)
