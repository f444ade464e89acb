"""The publisher against the in-memory endpoint on trio's autojump clock: the timing rules
(backoff, idle end, send timeout, an answer during the body) exactly and at once, no real peer.
The loopback tests (test_publisher.py, test_faults.py, ...) prove the same over real sockets."""

from __future__ import annotations

import itertools
import logging
from fractions import Fraction
from pathlib import Path

import pytest
import trio
import trio.testing

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.lifecycle import PublisherSettings
from orchestrator.push.memory import MemoryEndpoint
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import IdleSweeper, Publisher
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.wire.format import RequestPlan

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
K = 14_080_000
# The spec's forward buffer only (the last two fragments of each track), so resends are exact.
LIMITS = OutboxLimits(max_seconds=Fraction(60), max_bytes=64 * 1024 * 1024, unconfirmed_bytes=0)
SETTINGS = PublisherSettings(connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
                             retry=RetryPolicy(base=0.5, cap=2.0, slow=15.0, jitter=0.0))  # fmt: skip
SEGMENT_PATH = "/{stream}/{track}/{index}"
LABELS = {"stream": "video", "group": "primary", "endpoint": "memory", "endpoint_region": "test"}


class Rig:
    def __init__(self, endpoint: MemoryEndpoint, settings: PublisherSettings = SETTINGS,
                 plan: RequestPlan | None = None, authorization: str | None = None) -> None:  # fmt: skip
        profile = load_profile(DEMO)
        self.source = SyntheticStream(profile, profile.streams[0])
        self.board = HeaderBoard("primary", "video")
        self.board.announce(self.source.header)
        self.outbox = EndpointOutbox(LIMITS)
        self.metrics = Metrics()
        self.endpoint = endpoint
        extra = {} if plan is None else {"plan": plan, "url": "http://ingest.test/live/demo.isml/Streams(video)"}
        self.publisher = Publisher(
            group="primary", stream_id="video", header=self.board, outbox=self.outbox, metrics=self.metrics,
            endpoint=Endpoint(name="memory", region="test", url="http://ingest.test/live/demo.isml"),
            settings=settings, connector=endpoint, authorization=authorization,
            idle_sweeper=IdleSweeper(interval=0.5), **extra)  # fmt: skip
        self.header = self.source.header.data
        self.returned = trio.Event()  # the publisher's run() returned

    def fragment(self, k: int) -> bytes:
        return self.source.fragment(K + k)[0].data

    def push(self, *ks: int) -> None:
        for k in ks:
            self.outbox.push(self.source.fragment(K + k)[0])

    def metric(self, name: str, **extra: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {**LABELS, **extra})

    async def wait_for(self, predicate, seconds: float = 120.0) -> None:
        """Until ``predicate()`` holds once every task has done what it can (checked at each
        change of the endpoint, and every 0.1 s of the clock for what the publisher alone does)."""
        with trio.fail_after(seconds):
            while True:
                await trio.testing.wait_all_tasks_blocked()
                if predicate():
                    return
                with trio.move_on_after(0.1):
                    await self.endpoint.next_change()


async def run(rig: Rig, scenario) -> None:
    async def publish():
        await rig.publisher.run()
        rig.returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.publisher.idle_sweeper.run)
        nursery.start_soon(publish)
        await scenario()
        nursery.cancel_scope.cancel()


async def test_probe_then_one_post_header_then_fragments_then_a_clean_end(autojump_clock):
    rig = Rig(MemoryEndpoint(), authorization="Bearer s3cret")

    async def scenario():
        rig.push(0, 1, 2)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 1 and len(rig.endpoint.posts[0].chunks) == 4)
        rig.outbox.close()
        with trio.fail_after(5):
            await rig.returned.wait()  # run() returns by itself once the outbox is closed and drained

    await run(rig, scenario)
    probe, post = rig.endpoint.requests
    assert (probe.probe, probe.headers["Connection"], probe.complete, probe.status) == (True, "close", True, 200)
    assert post.path == b"/live/demo.isml/Streams(video)"
    assert post.headers["Authorization"] == "Bearer s3cret"
    assert post.headers["X-Encoder-Group"] == "primary"
    assert post.body == rig.header + rig.fragment(0) + rig.fragment(1) + rig.fragment(2)
    assert post.complete
    assert rig.metric("orchestrator_fragments_pushed_total") == 3
    assert rig.metric("orchestrator_posts_opened_total") == 1
    assert rig.metric("orchestrator_connections_opened_total") == 2  # the probe's and the POST's
    assert rig.metric("orchestrator_endpoint_up") == 0


async def test_smooth_keeps_no_connection_even_when_the_endpoint_would(autojump_clock):
    """Keep-alive is for one request per segment (CMAF): Smooth's probe and long POST each have
    a connection of their own, as before, whatever the endpoint allows."""
    rig = Rig(MemoryEndpoint())
    rig.endpoint.keep_alive = True

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 1 and len(rig.endpoint.posts[0].chunks) == 2)
        await rig.wait_for(lambda: rig.endpoint.posts[0].status == 200)  # ended idle
        rig.push(1)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 2 and len(rig.endpoint.posts[1].chunks) == 2)

    await run(rig, scenario)
    assert [(r.probe, r.connection) for r in rig.endpoint.requests] == [(True, 1), (False, 2), (True, 3), (False, 4)]
    assert rig.metric("orchestrator_connections_opened_total") == 4
    assert rig.endpoint.most_open == 1


async def test_an_unreachable_endpoint_is_retried_on_the_backoff_schedule_then_streams(autojump_clock):
    endpoint = MemoryEndpoint()
    endpoint.refuse = True
    rig = Rig(endpoint)

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: len(endpoint.connects) == 6)
        endpoint.refuse = False
        await rig.wait_for(lambda: len(endpoint.posts) == 1 and len(endpoint.posts[0].chunks) == 2)

    await run(rig, scenario)
    connects = endpoint.connects
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(connects)]
    # First retry at once, then 0.5, 1, 2 (the cap), 2; then the probe and its POST at once.
    assert gaps == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 0.0]
    assert rig.publisher.state.failures == 6
    assert rig.metric("orchestrator_post_failures_total", reason="transport") == 6
    assert rig.metric("orchestrator_reconnects_total") == 1
    assert endpoint.posts[0].body == rig.header + rig.fragment(0)


async def test_a_refusing_endpoint_is_retried_slowly_and_named(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator.push.publisher")
    rig = Rig(MemoryEndpoint(status=401))

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: len(rig.endpoint.requests) == 3)

    await run(rig, scenario)
    starts = [r.started for r in rig.endpoint.requests]
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [15.0, 15.0]  # retry.slow
    assert all(r.probe for r in rig.endpoint.requests)  # the probe fails fast: no POST
    assert rig.metric("orchestrator_post_failures_total", reason="unauthorized") == 3
    assert any("publisher.unauthorized" in r.getMessage() and "status=401" in r.getMessage() for r in caplog.records)


async def test_a_post_idle_for_the_idle_timeout_is_ended_and_the_next_fragment_opens_a_new_one(autojump_clock):
    rig = Rig(MemoryEndpoint())

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: rig.endpoint.posts and rig.endpoint.posts[0].status == 200)
        await trio.sleep(30)  # nothing happens while there is nothing to send
        assert len(rig.endpoint.requests) == 2
        rig.push(1)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 2 and len(rig.endpoint.posts[1].chunks) == 2)

    await run(rig, scenario)
    assert [r.probe for r in rig.endpoint.requests] == [True, False, True, False]
    first = rig.endpoint.posts[0]
    assert first.complete
    # Ended by the idle rule: 6 s after its fragment (sent when it opened), within one sweep (0.5 s).
    assert 6.0 <= first.answered - first.started <= 6.5
    assert rig.endpoint.posts[1].body == rig.header + rig.fragment(1)
    assert rig.publisher.state.failures == 0
    assert rig.metric("orchestrator_reconnects_total") is None


async def test_after_a_reset_the_next_post_resends_the_forward_buffer_first(autojump_clock):
    rig = Rig(MemoryEndpoint())

    async def scenario():
        rig.push(0, 1, 2)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 1 and len(rig.endpoint.posts[0].chunks) == 4)
        rig.endpoint.reset()
        await rig.wait_for(lambda: rig.publisher.state.failures == 1)
        rig.push(3)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 2 and len(rig.endpoint.posts[1].chunks) == 4)

    await run(rig, scenario)
    # The last two fragments (spec 4.7), then the new one, after the header.
    assert rig.endpoint.posts[1].body == rig.header + rig.fragment(1) + rig.fragment(2) + rig.fragment(3)
    assert rig.metric("orchestrator_resent_fragments_total") == 2
    assert rig.metric("orchestrator_reconnects_total") == 1
    assert rig.endpoint.posts[1].started == rig.endpoint.posts[0].ended  # a working POST broke: at once


async def test_a_connection_cut_mid_fragment_resends_that_fragment(autojump_clock):
    endpoint = MemoryEndpoint()
    rig = Rig(endpoint)
    endpoint.close_after = len(rig.header) + len(rig.fragment(0)) + 1000  # in the middle of fragment 1

    async def scenario():
        rig.push(0, 1)
        await rig.wait_for(lambda: endpoint.posts and endpoint.posts[0].ended is not None)
        endpoint.close_after = None  # for the connections from now on
        whole = len(rig.header) + len(rig.fragment(0)) + len(rig.fragment(1))
        await rig.wait_for(lambda: len(endpoint.posts[-1].body) == whole)

    await run(rig, scenario)
    for cut in endpoint.posts[:-1]:  # each cut in the middle of fragment 1: it never counted as written
        assert len(cut.body) == len(rig.header) + len(rig.fragment(0)) + 1000
    assert endpoint.posts[-1].body == rig.header + rig.fragment(0) + rig.fragment(1)


async def test_an_answer_during_the_body_ends_the_post_at_once(autojump_clock):
    endpoint = MemoryEndpoint()
    rig = Rig(endpoint, PublisherSettings(idle_timeout=60.0, retry=RetryPolicy(base=0.5, jitter=0.0)))
    endpoint.answer_after = (len(rig.header) + len(rig.fragment(0)), 503)

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: rig.publisher.state.failures == 1)
        rig.push(1)
        await rig.wait_for(lambda: len(endpoint.posts) == 2 and len(endpoint.posts[1].chunks) == 3)

    await run(rig, scenario)
    refused = endpoint.posts[0]
    assert refused.ended == refused.answered  # at once: not at the idle timeout (60 s) nor the next fragment
    assert not refused.complete
    assert "503" in rig.publisher.state.last_error
    assert rig.metric("orchestrator_post_failures_total", reason="server") == 1
    assert endpoint.posts[1].body == rig.header + rig.fragment(0) + rig.fragment(1)  # the refused one again


async def test_a_stalled_receiver_ends_the_post_at_the_publishers_own_send_timeout(autojump_clock):
    """The endpoint stops reading (its buffer holds less than a fragment): the write of the
    first fragment cannot complete, and the POST fails exactly ``send_timeout`` after it began."""
    endpoint = MemoryEndpoint(read_rate=0, buffer=8 * 1024)
    rig = Rig(endpoint)

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: rig.publisher.state.failures >= 1)

    await run(rig, scenario)
    post = endpoint.posts[0]
    assert post.ended - post.started == pytest.approx(SETTINGS.send_timeout)
    assert post.body == rig.header  # the fragment never made it
    assert "timed out (write, 3 s)" in rig.publisher.state.last_error
    assert rig.metric("orchestrator_post_failures_total", reason="transport") == 1


async def test_a_stalled_post_that_the_endpoint_resets_fails_at_once_not_at_the_send_timeout(autojump_clock):
    endpoint = MemoryEndpoint(read_rate=0, buffer=8 * 1024)
    rig = Rig(endpoint)

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: endpoint.posts)
        await trio.sleep(1.0)
        endpoint.reset()
        await rig.wait_for(lambda: rig.publisher.state.failures >= 1)

    await run(rig, scenario)
    post = endpoint.posts[0]
    assert post.ended - post.started == pytest.approx(1.0)
    assert "reset by the endpoint" in rig.publisher.state.last_error


async def test_a_slow_but_steady_receiver_is_not_cut(autojump_clock):
    """Each fragment takes 2 s to be read (under the 3 s send timeout); the POST takes 20 s."""
    rig = Rig(MemoryEndpoint(buffer=8 * 1024))
    rig.endpoint.read_rate = len(rig.fragment(0)) / 2.0

    async def scenario():
        rig.push(*range(10))
        rig.outbox.close()
        with trio.fail_after(60):
            await rig.returned.wait()

    await run(rig, scenario)
    post = rig.endpoint.posts[0]
    assert post.body == rig.header + b"".join(rig.fragment(k) for k in range(10))
    assert post.ended - post.started > 3 * SETTINGS.send_timeout
    assert rig.publisher.state.failures == 0


async def test_no_answer_after_the_body_is_a_failure_at_the_response_timeout(autojump_clock):
    endpoint = MemoryEndpoint()
    rig = Rig(endpoint)

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: len(endpoint.posts) == 1 and len(endpoint.posts[0].chunks) == 2)
        endpoint.silent = True  # the end of the body gets no answer
        rig.outbox.close()
        await rig.wait_for(lambda: rig.publisher.state.failures >= 1)

    await run(rig, scenario)
    post = rig.endpoint.posts[0]
    assert "timed out (response, 3 s)" in rig.publisher.state.last_error
    assert post.complete


async def test_a_per_segment_plan_sends_each_fragment_in_a_request_of_its_own(autojump_clock):
    rig = Rig(
        MemoryEndpoint(),
        plan=RequestPlan(per="segment", probe_first=True, header_on_every_request=False, path=SEGMENT_PATH),
    )

    async def scenario():
        rig.push(0, 1)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 2 and rig.endpoint.posts[1].status == 200)
        rig.push(2)
        await rig.wait_for(lambda: len(rig.endpoint.posts) == 3 and rig.endpoint.posts[2].status == 200)

    await run(rig, scenario)
    assert [r.probe for r in rig.endpoint.requests] == [True, False, False, False]  # one probe, for the session
    assert [p.body for p in rig.endpoint.posts] == [rig.header + rig.fragment(0), rig.fragment(1), rig.fragment(2)]
    assert all(p.complete for p in rig.endpoint.posts)
    assert rig.metric("orchestrator_posts_opened_total") == 3
