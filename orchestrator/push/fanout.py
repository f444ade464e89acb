"""The fan-out: one group's streams, each to every endpoint it goes to.

Theory of operation
-------------------
Whatever produces a group's streams hands each stream header and each fragment to a
:class:`FanOut` once; the fan-out gives the header to the stream's :class:`HeaderBoard` and the
fragment to the :class:`EndpointOutbox` of every endpoint of that stream (one per publisher),
never waiting: each outbox's bounds decide what it keeps. A full outbox drops its oldest
fragments; the fan-out counts them (``orchestrator_dropped_fragments_total`` and the publisher's
status) and logs each one (``publisher.backlog.dropped``), since the live edge matters more than
an old fragment the backlog cannot hold.

The producer may be the group's encoder (:class:`~orchestrator.encode.group.GroupEncoder`, after
its continuity gate) or, for a relay, a POST received from someone else's encoder: the fan-out
does not know which. :meth:`FanOut.close` ends every stream (the publishers send what is pending,
then end their POSTs). Trio events only (through the outboxes): no sockets here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.ops.metrics import LabelledChildren, Metrics
from orchestrator.ops.state import PublisherState
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One endpoint a stream goes to: its outbox, its publisher's state (the drop count the
    status shows) and its metric labels (stream, group, endpoint, region)."""

    outbox: EndpointOutbox
    publisher: PublisherState
    labels: tuple[str, str, str, str]
    metrics: LabelledChildren = field(compare=False)


class Tap(Protocol):
    """Sees every header and fragment the fan-out carries (the confidence monitor); never waits."""

    def header(self, header: StreamHeader) -> None: ...

    def fragment(self, fragment: EncodedFragment) -> None: ...


class FanOut:
    """One group's routes: a header board per stream, an outbox per (stream, endpoint)."""

    def __init__(self, group: str, metrics: Metrics) -> None:
        self.group = group
        self.metrics = metrics
        self.tap: Tap | None = None
        self.boards: dict[str, HeaderBoard] = {}
        self._routes: dict[str, list[Route]] = {}

    def add_stream(self, stream_id: str) -> HeaderBoard:
        """The stream's header board (made on first call): every publisher of the stream waits on it."""
        board = self.boards.get(stream_id)
        if board is None:
            board = self.boards[stream_id] = HeaderBoard(self.group, stream_id)
            self._routes[stream_id] = []
        return board

    def add_route(self, stream_id: str, outbox: EndpointOutbox, publisher: PublisherState,
                  labels: tuple[str, str, str, str]) -> Route:  # fmt: skip
        """A new endpoint for ``stream_id``: its outbox, which the fan-out fills from now on."""
        self.add_stream(stream_id)
        route = Route(outbox, publisher, labels, LabelledChildren(self.metrics, labels))
        self._routes[stream_id].append(route)
        return route

    def routes(self, stream_id: str | None = None) -> Iterator[Route]:
        """The routes of one stream, or of all of them."""
        if stream_id is not None:
            yield from self._routes.get(stream_id, ())
            return
        for routes in self._routes.values():
            yield from routes

    # --- what a producer calls (the encoder's sink has the same two methods) -----------------

    def header(self, header: StreamHeader) -> None:
        """Announce ``header`` for its stream; a stream the fan-out does not route is ignored."""
        board = self.boards.get(header.stream_id)
        if board is not None:
            board.announce(header)
            if self.tap is not None:
                self.tap.header(header)

    def fragment(self, fragment: EncodedFragment) -> int:
        """Push ``fragment`` into the outbox of every endpoint of its stream, without waiting;
        count and log what each full outbox dropped. Returns how many fragments were dropped."""
        dropped = 0
        if self.tap is not None:
            self.tap.fragment(fragment)
        for route in self._routes.get(fragment.stream_id, ()):
            lost = route.outbox.push(fragment)
            if lost:
                dropped += len(lost)
                self._count_dropped(route, lost)
        return dropped

    def close(self) -> None:
        """End every stream: each publisher sends what is pending, ends its POST and returns."""
        for route in self.routes():
            route.outbox.close()

    def _count_dropped(self, route: Route, lost: list[EncodedFragment]) -> None:
        route.metrics.dropped_fragments.inc(len(lost))
        route.publisher.dropped += len(lost)
        endpoint = route.publisher.endpoint
        for fragment in lost:
            log.warning(
                "publisher.backlog.dropped group=%s stream=%s endpoint=%s index=%d track=%d reason=backlog_full",
                self.group, fragment.stream_id, endpoint, fragment.index, fragment.track_id)  # fmt: skip
