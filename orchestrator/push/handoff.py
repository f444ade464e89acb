"""The hand-off between what produces a stream and its publishers.

The fan-out (:mod:`orchestrator.push.fanout`, fed by the group's encoder or a relay) pushes
every fragment into one :class:`EndpointOutbox` per endpoint without ever waiting (the outbox's
bounds decide what is kept), and announces the stream header on a :class:`HeaderBoard`; each
publisher waits on both. Trio events only: no sockets here.
"""

from __future__ import annotations

import logging

import trio

from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.push.outbox import Outbox, OutboxLimits

log = logging.getLogger(__name__)


class EndpointOutbox:
    """An :class:`~orchestrator.push.outbox.Outbox` with a trio wake-up: the fan-out pushes without
    ever waiting, the publisher waits for the next fragment."""

    def __init__(self, limits: OutboxLimits) -> None:
        self.outbox = Outbox(limits)
        self._changed = trio.Event()

    def push(self, fragment: EncodedFragment) -> list[EncodedFragment]:
        dropped = self.outbox.push(fragment)
        self.wake()
        return dropped

    def close(self) -> None:
        self.outbox.close()
        self.wake()

    async def wait_for_work(self) -> bool:
        """Wait until a fragment is pending (True) or the outbox is finished (False)."""
        while not len(self.outbox):
            if self.outbox.finished:
                return False
            await self.wait_for_change()
        return True

    async def wait_for_change(self) -> None:
        """Wait until a fragment is pushed, the outbox is closed, or :meth:`wake` is called."""
        self._changed = trio.Event()
        await self._changed.wait()

    def wake(self) -> None:
        """Wake the publisher's :meth:`wait_for_change` (it has something else to look at)."""
        self._changed.set()


class HeaderBoard:
    """The stream header of one (group, stream), as the encoder instance last announced it.

    Every POST opens with it. An instance restarted with identical settings announces identical
    bytes; if they ever differ (an ffmpeg upgrade, a changed source), the open POSTs end and the
    next ones carry the new header, and the change is logged: receivers treat a different header
    on the same stream as a mismatch (spec 7.5.c, 8.3).
    """

    def __init__(self, group: str, stream_id: str) -> None:
        self.group = group
        self.stream_id = stream_id
        self.header: StreamHeader | None = None
        self.version = 0
        self._changed = trio.Event()

    def announce(self, header: StreamHeader) -> None:
        if self.header is not None and header.data == self.header.data:
            return
        if self.header is not None:
            log.warning("encoder.header_changed group=%s stream=%s bytes=%d->%d", self.group, self.stream_id,
                        len(self.header.data), len(header.data))  # fmt: skip
        self.header = header
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> StreamHeader:
        while self.header is None:
            await self._changed.wait()
        return self.header
