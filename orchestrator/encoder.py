"""Encoder instances: trio tasks that release one fragment per shared-clock period.

An encoder instance serves one stream of one group. It starts with the fragment being captured
when it starts (``live_index``), waits until that fragment is complete on every track
(``fragment_due_ns``), hands the track fragments to every endpoint queue of the stream without
waiting (a full queue drops its oldest fragment, counted and logged), and moves to the next
index. Index and timestamps come only from the shared clock, never from a counter of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.clock import fragment_due_ns, live_index
from orchestrator.metrics import Metrics
from orchestrator.publisher import EndpointQueue, PublisherState
from orchestrator.synthetic import SyntheticStream
from orchestrator.wallclock import WallClock

log = logging.getLogger(__name__)


@dataclass
class EncoderState:
    group: str
    stream_id: str
    last_index: int | None = None
    fragments: int = 0


@dataclass(frozen=True)
class Output:
    """One endpoint the stream goes to: its queue, and the publisher state for logging."""

    queue: EndpointQueue
    publisher: PublisherState
    labels: tuple[str, str, str, str]


async def run_synthetic_encoder(
    source: SyntheticStream,
    outputs: Sequence[Output],
    *,
    group: str,
    wall: WallClock,
    metrics: Metrics,
    state: EncoderState,
) -> None:
    """Release fragments of ``source`` on the shared clock until cancelled.

    Cancellation: stops between fragments (a fragment is built and queued in one step, with no
    checkpoint in between), so every endpoint's queue ends on a whole fragment set. The caller
    closes the queues afterwards.
    """
    stream_id = source.stream.id
    k = live_index(source.clocks, wall.now_ns())
    log.info("encoder.started group=%s stream=%s backend=synthetic first_index=%d", group, stream_id, k)
    while True:
        await wall.sleep_until_ns(fragment_due_ns(source.clocks, k))
        fragments = source.fragment(k)
        for output in outputs:
            for fragment in fragments:
                for lost in output.queue.put_nowait(fragment):
                    metrics.queue_dropped.labels(*output.labels).inc()
                    log.warning(
                        "publisher.queue.dropped group=%s stream=%s endpoint=%s index=%d track=%d reason=queue_full",
                        group, stream_id, output.publisher.endpoint, lost.index, lost.track_id)  # fmt: skip
            metrics.queue_depth.labels(*output.labels).set(len(output.queue))
        metrics.fragments_encoded.labels(stream_id, group).inc(len(fragments))
        metrics.last_encoded_index.labels(stream_id, group).set(k)
        state.last_index = k
        state.fragments += 1
        log.debug("encoder.fragment group=%s stream=%s index=%d", group, stream_id, k)
        k += 1
