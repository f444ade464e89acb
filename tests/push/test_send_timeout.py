"""The publisher's own send timeout, over real loopback sockets.

On loopback a stalled receiver is usually ended by the kernel first: the publisher's connections
carry ``TCP_USER_TIMEOUT`` equal to the send timeout, so a test that uses the connector ``up``
builds cannot tell the two apart (a send timeout of 60 s passed the whole suite). Here the
connector's ``TCP_USER_TIMEOUT`` is 30 s and the publisher's send timeout 1-2 s:

* a receiver that stops reading must end the POST at the send timeout, not at 30 s;
* a receiver that reads slowly but steadily (each fragment written within the send timeout,
  the whole POST lasting several send timeouts) must not be cut.

The same two rules on the autojump clock, exactly: test_publisher_clocked.py.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import trio

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile
from orchestrator.push.connection import Connector
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.lifecycle import PublisherSettings
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import Publisher
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.testing.countsink import CountSink
from orchestrator.testing.faultproxy import Fault, FaultProxy

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
K = 14_080_000
KERNEL_TIMEOUT = 30.0  # TCP_USER_TIMEOUT of the connections here: far beyond the send timeout


async def start(nursery: trio.Nursery, settings: PublisherSettings) -> tuple[Publisher, FaultProxy, CountSink, list]:
    """A counting sink behind a fault proxy (small receive buffer), and a publisher pushing to it."""
    sink = CountSink()
    _, sink_port = await nursery.start(sink.serve, "127.0.0.1", 0)
    proxy = FaultProxy(("127.0.0.1", sink_port))
    _, proxy_port = await nursery.start(proxy.run)
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    board = HeaderBoard("primary", "video")
    board.announce(source.header)
    outbox = EndpointOutbox(OutboxLimits(max_seconds=Fraction(600), max_bytes=1 << 30))
    publisher = Publisher(
        group="primary", stream_id="video", header=board, outbox=outbox, metrics=Metrics(), settings=settings,
        endpoint=Endpoint(name="local", region="test", url=f"http://127.0.0.1:{proxy_port}/live/demo.isml"),
        connector=Connector(KERNEL_TIMEOUT))  # fmt: skip
    fragments = [source.fragment(K + k)[0] for k in range(40)]  # ~63 kB each
    return publisher, proxy, sink, fragments


async def wait_until(predicate, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.02)


async def test_a_receiver_that_stops_reading_ends_the_post_at_the_publishers_send_timeout():
    settings = PublisherSettings(send_timeout=1.0, idle_timeout=60.0, response_timeout=5.0,
                                 retry=RetryPolicy(base=5.0, cap=5.0, jitter=0.0))  # fmt: skip
    async with trio.open_nursery() as nursery:
        publisher, proxy, sink, fragments = await start(nursery, settings)
        publisher.outbox.push(fragments[0])
        nursery.start_soon(publisher.run)
        await wait_until(lambda: sink.counts.fragments_total == 1, 10)
        proxy.set_fault(Fault.BLACKHOLE)  # open, but not one more byte read: the buffers fill
        stalled_at = trio.current_time()
        for fragment in fragments[1:]:  # 2.5 MB: more than the socket buffers hold
            publisher.outbox.push(fragment)
        await wait_until(lambda: publisher.state.failures >= 1, KERNEL_TIMEOUT / 2)
        ended_after = trio.current_time() - stalled_at
        nursery.cancel_scope.cancel()
    assert "timed out (write, 1 s)" in (publisher.state.last_error or "")
    assert 1.0 <= ended_after < 1.0 + 2.0, ended_after  # the send timeout (plus filling the buffers), not 30 s


async def test_a_receiver_that_reads_slowly_but_steadily_is_not_cut():
    settings = PublisherSettings(send_timeout=2.0, idle_timeout=60.0, response_timeout=30.0,
                                 retry=RetryPolicy(base=5.0, cap=5.0, jitter=0.0))  # fmt: skip
    count = 8
    async with trio.open_nursery() as nursery:
        publisher, proxy, sink, fragments = await start(nursery, settings)
        rate = 100_000  # bytes a second: a 63 kB fragment in about 0.65 s, the whole POST in about 5 s
        proxy.set_fault(Fault.DRIP, drip_bytes_per_second=rate)
        began = trio.current_time()
        for fragment in fragments[:count]:
            publisher.outbox.push(fragment)
        publisher.outbox.close()
        with trio.fail_after(60):
            await publisher.run()
        took = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert publisher.state.failures == 0, publisher.state.last_error
    assert sink.counts.fragments_total == count
    assert sink.counts.requests == 2  # the probe and one POST
    assert took > 2 * settings.send_timeout  # the drip was slower than the send timeout, overall
