"""CMAF endpoints on the push side: a publisher per track, its header alone first and after any
failure, one request per segment to the segment's URL. On the in-memory endpoint and trio's
autojump clock, then once over a real loopback socket; what a publisher sends is read by mp4box.js."""

from __future__ import annotations

import itertools
import logging
from fractions import Fraction
from pathlib import Path

import pytest
import trio
import trio.testing
from parsekit import mp4box, needs_mp4box
from publisherkit import TWO_TRACKS

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.errors import EndpointError
from orchestrator.ops.httpserve import serve_asgi
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile, parse_profile
from orchestrator.push.cmafroute import Reboxer, add_cmaf_publishers
from orchestrator.push.fanout import FanOut
from orchestrator.push.lifecycle import (
    BACKED_OFF,
    DONE,
    DRAINED,
    EXPIRED,
    HEADER_SENT,
    NEXT,
    OPEN,
    OPEN_AFTER_FAILURE,
    OPEN_REUSED,
    OPENED,
    PROBE,
    READY,
    SEND_FRAGMENT,
    SEND_HEAD_AND_HEADER,
    SEND_HEAD_ONLY,
    SMOOTH,
    WAIT_FOR_WORK,
    WORK,
    WRITTEN_NEW,
    Answered,
    BackOff,
    Completed,
    Failed,
    Finish,
    Lifecycle,
    LifecycleError,
    Open,
    PublisherSettings,
    Rewind,
    Rewound,
    SendHeader,
)
from orchestrator.push.memory import MemoryEndpoint
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import IdleSweeper
from orchestrator.push.reconnect import Failure, RetryPolicy
from orchestrator.wire import cmaf
from orchestrator.wire.format import RequestPlan

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
NOW_NS = 1_800_000_000 * 10**9
K = 14_080_000
LIMITS = OutboxLimits(max_seconds=Fraction(60), max_bytes=64 * 1024 * 1024, unconfirmed_bytes=0)
SETTINGS = PublisherSettings(connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
                             retry=RetryPolicy(base=0.5, cap=2.0, slow=15.0, jitter=0.0))  # fmt: skip
BASE = "http://ingest.test/in/v1/group/1/channel"


class Rig:
    """The demo's video stream (one track) to one CMAF endpoint, through a fan-out."""

    def __init__(self, endpoint: MemoryEndpoint, paths: str = "template") -> None:
        profile = load_profile(DEMO, now_ns=NOW_NS)
        stream = profile.streams[0]
        self.source = SyntheticStream(profile, stream)
        self.metrics = Metrics()
        self.fanout = FanOut("primary", self.metrics)
        board = self.fanout.add_stream(stream.id)
        board.announce(self.source.header)
        self.endpoint = endpoint
        target = Endpoint(name="memory", region="test", url=BASE, format="cmaf", cmaf_paths=paths)
        self.reboxer = Reboxer(profile.presentation.epoch_ns)
        [self.publisher] = add_cmaf_publishers(
            self.fanout, board, [(1, "video_360p")], target, reboxer=self.reboxer, limits=LIMITS,
            metrics=self.metrics, settings=SETTINGS, connector=endpoint, idle_sweeper=IdleSweeper(0.5))  # fmt: skip
        segmenter = cmaf.Segmenter(profile.presentation.epoch_ns)
        [(_, header)] = segmenter.track_headers(self.source.header).values()
        self.header = header.data
        self.segment = lambda k: segmenter.segment(self.source.fragment(K + k)[0])

    def push(self, *ks: int) -> None:
        for k in ks:
            for fragment in self.source.fragment(K + k):
                self.fanout.fragment(fragment)

    def sent(self) -> list[tuple[str, bytes, int | None]]:
        return [(r.path.decode(), r.body, r.status) for r in self.endpoint.requests]

    async def wait_for(self, predicate, seconds: float = 120.0) -> None:
        with trio.fail_after(seconds):
            while True:
                await trio.testing.wait_all_tasks_blocked()
                if predicate():
                    return
                with trio.move_on_after(0.1):
                    await self.endpoint.next_change()

    def answered(self, n: int):
        return lambda: len(self.endpoint.requests) == n and self.endpoint.requests[-1].status is not None


async def run(rig: Rig, scenario) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.publisher.idle_sweeper.run)
        nursery.start_soon(rig.publisher.run)
        await scenario()
        nursery.cancel_scope.cancel()


HEADER_PATH = "/in/v1/group/1/channel/video/video_360p/init.m4s"


def segment_path(k: int) -> str:
    return f"/in/v1/group/1/channel/video/video_360p/{K + k}.m4s"


async def test_the_header_goes_alone_first_then_one_request_per_segment_at_its_own_url(autojump_clock):
    rig = Rig(MemoryEndpoint())

    async def scenario():
        rig.push(0, 1)
        await rig.wait_for(rig.answered(3))
        rig.push(2)
        await rig.wait_for(rig.answered(4))

    await run(rig, scenario)
    assert rig.sent() == [(HEADER_PATH, rig.header, 200), (segment_path(0), rig.segment(0), 200),
                          (segment_path(1), rig.segment(1), 200), (segment_path(2), rig.segment(2), 200)]  # fmt: skip
    assert all(r.complete and not r.probe for r in rig.endpoint.requests)
    assert rig.publisher.stream_id == "video-video_360p"


async def test_streams_paths_name_the_track_on_every_request(autojump_clock):
    rig = Rig(MemoryEndpoint(), paths="streams")

    async def scenario():
        rig.push(0, 1)
        await rig.wait_for(rig.answered(3))

    await run(rig, scenario)
    path = "/in/v1/group/1/channel/Streams(video-video_360p)"
    assert rig.sent() == [(path, rig.header, 200), (path, rig.segment(0), 200), (path, rig.segment(1), 200)]


async def test_a_412_resends_the_header_then_the_segment(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator.push.publisher")
    rig = Rig(MemoryEndpoint())

    async def scenario():
        rig.push(0)
        await rig.wait_for(rig.answered(2))
        rig.endpoint.answer_after = (1, 412)  # the origin lost the init (a restart): "precondition failed"
        rig.push(1)
        await rig.wait_for(rig.answered(6))

    await run(rig, scenario)
    # The header goes again, then the forward buffer: the last fragment written (0) and the one refused (1).
    assert [(p, s) for p, _, s in rig.sent()] == [(HEADER_PATH, 200), (segment_path(0), 200), (segment_path(1), 412),
                                                  (HEADER_PATH, 200), (segment_path(0), 200),
                                                  (segment_path(1), 200)]  # fmt: skip
    assert [body for _, body, s in rig.sent() if s == 200] == [rig.header, rig.segment(0), rig.header, rig.segment(0),
                                                               rig.segment(1)]  # fmt: skip
    assert rig.publisher.state.last_error is not None
    assert "HTTP 412" in rig.publisher.state.last_error


@pytest.mark.parametrize(("status", "reason", "event"), [(403, "unauthorized", "publisher.unauthorized"),
                                                         (404, "not_found", "publisher.not_found")])  # fmt: skip
async def test_403_and_404_are_named_and_retried_slowly(autojump_clock, caplog, status, reason, event):
    caplog.set_level(logging.INFO, logger="orchestrator.push.publisher")
    rig = Rig(MemoryEndpoint(status=status))

    async def scenario():
        rig.push(0)
        await rig.wait_for(lambda: len(rig.endpoint.requests) == 3)

    await run(rig, scenario)
    assert [r.path.decode() for r in rig.endpoint.requests] == [HEADER_PATH] * 3  # the header is never past
    starts = [r.started for r in rig.endpoint.requests]
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [15.0, 15.0]  # retry.slow
    labels = {"stream": "video-video_360p", "group": "primary", "endpoint": "memory", "endpoint_region": "test"}
    assert rig.metrics.registry.get_sample_value("orchestrator_post_failures_total", {**labels, "reason": reason}) == 3
    assert any(event in r.getMessage() and f"status={status}" in r.getMessage() for r in caplog.records)


async def test_a_reset_mid_segment_resends_header_then_forward_buffer(autojump_clock):
    rig = Rig(MemoryEndpoint())

    async def scenario():
        rig.push(0)
        await rig.wait_for(rig.answered(2))
        rig.endpoint.close_after = len(rig.header) + 100  # connections die past the header's size
        rig.push(1)
        await rig.wait_for(lambda: len(rig.endpoint.requests) >= 3 and rig.endpoint.requests[2].ended is not None)
        rig.endpoint.close_after = None  # (the retry is immediate: some requests may still die)
        await rig.wait_for(lambda: rig.sent()[-1][0::2] == (segment_path(1), 200))

    await run(rig, scenario)
    sent = rig.sent()
    assert [(p, s) for p, _, s in sent[:3]] == [(HEADER_PATH, 200), (segment_path(0), 200), (segment_path(1), None)]
    # Every request after a failure is the header's; after the last failure, header then forward buffer.
    assert all(sent[n + 1][0] == HEADER_PATH for n in range(len(sent) - 1) if sent[n][2] is None)
    last_failure = max(n for n, (_, _, status) in enumerate(sent) if status is None)
    assert sent[last_failure + 1 :] == [(HEADER_PATH, rig.header, 200), (segment_path(0), rig.segment(0), 200),
                                        (segment_path(1), rig.segment(1), 200)]  # fmt: skip


async def test_a_path_that_takes_headers_but_breaks_every_segment_backs_off(autojump_clock):
    """A header that went through is no progress: without this rule the retry after each broken
    segment was immediate, forever (a hot loop that never let the clock move)."""
    rig = Rig(MemoryEndpoint())
    rig.endpoint.close_after = len(rig.header) + 100

    async def scenario():
        rig.push(0)
        # On every change, not once all tasks are blocked: in the hot loop they never were.
        with trio.fail_after(120):
            await rig.endpoint.wait_for(lambda: len(rig.endpoint.requests) >= 12)

    await run(rig, scenario)
    segments = [r.started for r in rig.endpoint.requests[:12] if r.path.decode() == segment_path(0)]
    assert [round(b - a, 6) for a, b in itertools.pairwise(segments)] == [0.0, 0.5, 1.0, 2.0, 2.0]


async def test_a_segment_dropped_by_the_bound_while_its_request_connects_is_not_sent_under_another_url(
        autojump_clock):  # fmt: skip
    """The URL names the fragment pending when the request starts; if the backlog's bound drops
    it meanwhile, the next fragment must not go out under the dropped one's URL."""
    rig = Rig(MemoryEndpoint())
    rig.endpoint.connect_delay = 1.0

    async def scenario():
        rig.push(0)
        await rig.wait_for(rig.answered(2))
        await rig.wait_for(lambda: len(rig.endpoint.connects) == 2)
        outbox = rig.publisher.outbox.outbox
        rig.push(1)
        await rig.wait_for(lambda: len(rig.endpoint.connects) == 3)  # the request for 1 is connecting
        outbox.limits = OutboxLimits(max_seconds=Fraction(2), max_bytes=64 * 1024 * 1024, unconfirmed_bytes=0)
        rig.push(2)  # the bound now holds one fragment: 1 is dropped, 2 is next
        await rig.wait_for(lambda: any(r.status == 200 and r.path.decode() == segment_path(2)
                                       for r in rig.endpoint.requests))  # fmt: skip

    await run(rig, scenario)
    for path, body, _ in rig.sent():
        if path != HEADER_PATH:
            assert body in (rig.segment(int(path.rsplit("/", 1)[1].removesuffix(".m4s")) - K), b"")


# --- keep-alive: one connection per track, on the in-memory endpoint --------------------------


def keep_alive_rig() -> Rig:
    rig = Rig(MemoryEndpoint())
    rig.endpoint.keep_alive = True
    return rig


def counter(rig: Rig, name: str) -> float | None:
    labels = {"stream": "video-video_360p", "group": "primary", "endpoint": "memory", "endpoint_region": "test"}
    return rig.metrics.registry.get_sample_value(name, labels)


async def test_the_header_and_every_segment_go_over_one_kept_connection(autojump_clock):
    rig = keep_alive_rig()

    async def scenario():
        rig.push(0, 1)
        await rig.wait_for(rig.answered(3))
        for k in range(2, 6):
            await trio.sleep(2.0)  # a segment duration: well within the keep-alive timeout (6 s)
            rig.push(k)
            await rig.wait_for(rig.answered(k + 2))

    await run(rig, scenario)
    assert rig.sent() == [(HEADER_PATH, rig.header, 200)] + [(segment_path(k), rig.segment(k), 200) for k in range(6)]
    assert [r.connection for r in rig.endpoint.requests] == [1] * 7
    assert (len(rig.endpoint.connects), rig.endpoint.most_open) == (1, 1)
    assert counter(rig, "orchestrator_connections_opened_total") == 1
    assert counter(rig, "orchestrator_posts_opened_total") == 7  # one request per segment, as before


async def test_an_endpoint_that_keeps_no_connection_gets_a_new_one_per_request_and_nothing_else_changes(
        autojump_clock):  # fmt: skip
    rig = Rig(MemoryEndpoint())  # keep_alive off: every answer is as if with Connection: close

    async def scenario():
        rig.push(0, 1, 2)
        await rig.wait_for(rig.answered(4))

    await run(rig, scenario)
    assert rig.sent() == [(HEADER_PATH, rig.header, 200)] + [(segment_path(k), rig.segment(k), 200) for k in range(3)]
    assert [r.connection for r in rig.endpoint.requests] == [1, 2, 3, 4]
    assert rig.endpoint.most_open == 1
    assert counter(rig, "orchestrator_connections_opened_total") == 4


async def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_failure(autojump_clock):
    rig = keep_alive_rig()

    async def scenario():
        rig.push(0)
        await rig.wait_for(rig.answered(2))
        rig.endpoint.close_idle()  # the server's keep-alive timeout
        rig.push(1)
        await rig.wait_for(rig.answered(3))
        rig.push(2)
        await rig.wait_for(rig.answered(4))

    await run(rig, scenario)
    # No failure, so no header again and no resend: just a new connection.
    assert rig.sent() == [(HEADER_PATH, rig.header, 200)] + [(segment_path(k), rig.segment(k), 200) for k in range(3)]
    assert [r.connection for r in rig.endpoint.requests] == [1, 1, 2, 2]
    assert (rig.publisher.state.failures, rig.endpoint.most_open) == (0, 1)


async def test_a_kept_connection_unused_for_the_keepalive_timeout_is_closed(autojump_clock):
    rig = keep_alive_rig()
    closed_after: list[float] = []

    async def scenario():
        rig.push(0)
        await rig.wait_for(rig.answered(2))
        answered = rig.endpoint.requests[-1].answered
        with trio.fail_after(60):
            await rig.endpoint.wait_for(lambda: rig.endpoint.open_connections == 0)
        closed_after.append(trio.current_time() - answered)
        rig.push(1)
        await rig.wait_for(rig.answered(3))

    await run(rig, scenario)
    assert closed_after == [SETTINGS.keepalive_timeout]  # on trio's clock: exactly, not about
    assert rig.sent() == [(HEADER_PATH, rig.header, 200)] + [(segment_path(k), rig.segment(k), 200) for k in range(2)]
    assert [r.connection for r in rig.endpoint.requests] == [1, 1, 2]
    assert rig.publisher.state.failures == 0


async def test_a_kept_connection_dying_mid_segment_resends_header_then_forward_buffer_on_one_new_connection(
        autojump_clock):  # fmt: skip
    rig = keep_alive_rig()

    async def scenario():
        rig.push(0, 1)
        await rig.wait_for(rig.answered(3))
        rig.endpoint.close_after = 100  # the next request's connection dies 100 bytes into its body
        rig.push(2)
        await rig.wait_for(lambda: rig.publisher.state.failures >= 1)
        rig.endpoint.close_after = None
        await rig.wait_for(lambda: rig.sent()[-1][0::2] == (segment_path(2), 200))

    await run(rig, scenario)
    sent, requests = rig.sent(), rig.endpoint.requests
    assert sent[:3] == [(HEADER_PATH, rig.header, 200), (segment_path(0), rig.segment(0), 200),
                        (segment_path(1), rig.segment(1), 200)]  # fmt: skip
    assert (sent[3][0], sent[3][2], requests[3].connection) == (segment_path(2), None, 1)  # on the kept connection
    # After the last failure: the header alone, then the forward buffer (the last two segments
    # written, 0 and 1, and 2, which failed), all on one new connection.
    last_failure = max(n for n, (_, _, status) in enumerate(sent) if status is None)
    assert sent[last_failure + 1 :] == [(HEADER_PATH, rig.header, 200)] + [(segment_path(k), rig.segment(k), 200)
                                                                         for k in range(3)]  # fmt: skip
    assert len({r.connection for r in requests[last_failure + 1 :]}) == 1
    assert rig.endpoint.most_open == 1


# --- over a real loopback socket --------------------------------------------------------------


class Recorder:
    """A recording ASGI app (served by hypercorn, as the ingest server is): each request's method,
    path and body; answers the next status of ``script`` (200 once it is empty)."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.requests: list[tuple[str, str, bytes, int]] = []
        self.script = script or []
        self.changed = trio.Event()

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        status = self.script.pop(0) if self.script else 200
        self.requests.append((scope["method"], scope["path"], body, status))
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        self.changed.set()
        self.changed = trio.Event()


async def test_over_loopback_header_then_segments_and_a_412_resends_the_header():
    recorder = Recorder(script=[200, 200, 412])  # the header, segment 0, then segment 1 is refused
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, recorder, "127.0.0.1", 0, "recorder")
        rig = Rig(MemoryEndpoint())  # for its stream, fan-out and expected bytes; the publisher below is real
        target = Endpoint(name="local", region="test", url=f"http://127.0.0.1:{port}/cmaf", format="cmaf",
                          cmaf_paths="template")  # fmt: skip
        fanout = FanOut("primary", Metrics())
        board = fanout.add_stream("video")
        board.announce(rig.source.header)
        [publisher] = add_cmaf_publishers(fanout, board, [(1, "video_360p")], target, reboxer=rig.reboxer,
                                          limits=LIMITS, metrics=fanout.metrics, settings=SETTINGS)  # fmt: skip
        returned = trio.Event()

        async def publish() -> None:
            await publisher.run()
            returned.set()

        nursery.start_soon(publish)
        for k in range(3):
            for fragment in rig.source.fragment(K + k):
                fanout.fragment(fragment)
        with trio.fail_after(30):
            while not any(path.endswith(f"/{K + 2}.m4s") and status == 200 for _, path, _, status in recorder.requests):
                await recorder.changed.wait()
            fanout.close()
            await returned.wait()
        nursery.cancel_scope.cancel()

    def seg(k: int) -> tuple[str, str, bytes, int]:
        return ("POST", f"/cmaf/video/video_360p/{K + k}.m4s", rig.segment(k), 200)

    header = ("POST", "/cmaf/video/video_360p/init.m4s", rig.header, 200)
    refused = recorder.requests[2]
    assert refused[1::2] == (f"/cmaf/video/video_360p/{K + 1}.m4s", 412)
    last = ("POST", f"/cmaf/video/video_360p/{K + 2}.m4s", cmaf.mark_last(rig.segment(2)), 200)  # the stream ended
    assert recorder.requests == [header, seg(0), refused, header, seg(0), seg(1), seg(2), last]


# --- the lifecycle's rule, step by step --------------------------------------------------------


def test_the_lifecycle_sends_a_header_alone_first_and_again_after_a_failure():
    m = Lifecycle("http://x/init.m4s", SETTINGS, cmaf.PATH_SCHEMES["template"].plan, jitter=lambda: 0.0)
    steps = [
        (WORK, Open(reconnect=False), True), (OPENED, SendHeader(with_header=True), True),
        (HEADER_SENT, Finish("header", 3.0), False), (Answered(200), Completed(200), False),
        (WORK, Open(reconnect=False), False), (OPENED, SendHeader(with_header=False), False),
        (HEADER_SENT, NEXT, False), (READY, SEND_FRAGMENT, False), (WRITTEN_NEW, Finish("segment", 3.0), False),
    ]  # fmt: skip
    for event, action, header_due in steps:
        assert (m.handle(event, 0.0), m.header_due) == (action, header_due)
    rewind = m.handle(Answered(412, "Precondition Failed"), 0.0)
    assert isinstance(rewind, Rewind)
    assert (rewind.failure, rewind.error.status_code, rewind.attempt, m.header_due) == (Failure.REJECTED, 412, 1, True)


def segment_request(m: Lifecycle, now: float, opening: Open, answer: Answered, done: Completed | type[Rewind]) -> None:
    """One segment's request, from WORK to its answer, at ``now``."""
    steps = [(WORK, opening), (OPENED, SEND_HEAD_ONLY), (HEADER_SENT, NEXT), (READY, SEND_FRAGMENT),
             (WRITTEN_NEW, Finish("segment", 3.0))]  # fmt: skip
    for event, action in steps:
        assert m.handle(event, now) == action, event
    action = m.handle(answer, now)
    assert action == done if isinstance(done, Completed) else isinstance(action, done)


def test_the_lifecycle_keeps_a_reusable_connection_between_segments_until_the_keepalive_timeout():
    """Per segment, a request answered on a connection that can carry another keeps it for
    ``keepalive_timeout`` (6 s here); the next request reuses it if it comes before then."""
    m = Lifecycle("http://x/init.m4s", SETTINGS, cmaf.PATH_SCHEMES["template"].plan, jitter=lambda: 0.0)
    keep = Answered(200, "OK", reusable=True)
    for event, action in [(WORK, OPEN), (OPENED, SEND_HEAD_AND_HEADER), (HEADER_SENT, Finish("header", 3.0)),
                          (keep, Completed(200, keep=True))]:  # fmt: skip
        assert m.handle(event, 0.0) == action
    assert m.kept_until == 6.0
    segment_request(m, 2.0, OPEN_REUSED, keep, Completed(200, keep=True))  # within 6 s: reused
    assert m.kept_until == 8.0  # counted from the last answer
    segment_request(m, 7.999, OPEN_REUSED, keep, Completed(200, keep=True))
    segment_request(m, 13.999, OPEN, keep, Completed(200, keep=True))  # at kept_until (7.999 + 6): a new one
    # The server said Connection: close (or ended the body by closing): nothing kept.
    segment_request(m, 16.0, OPEN_REUSED, Answered(200, "OK", reusable=False), Completed(200))
    assert m.kept_until is None
    segment_request(m, 17.0, OPEN, keep, Completed(200, keep=True))
    assert m.header_due is False  # none of this resent the header


def test_the_kept_connection_expires_at_kept_until_and_is_forgotten():
    m = Lifecycle("http://x/init.m4s", SETTINGS, cmaf.PATH_SCHEMES["template"].plan, jitter=lambda: 0.0)
    for event, action in [(WORK, OPEN), (OPENED, SEND_HEAD_AND_HEADER), (HEADER_SENT, Finish("header", 3.0)),
                          (Answered(201, reusable=True), Completed(201, keep=True))]:  # fmt: skip
        assert m.handle(event, 1.0) == action
    with pytest.raises(LifecycleError, match="no kept connection expires"):
        m.handle(EXPIRED, 6.999)  # the shell's deadline is kept_until: it cannot wake before
    assert m.handle(EXPIRED, 7.0) == WAIT_FOR_WORK
    assert m.kept_until is None
    with pytest.raises(LifecycleError, match="no kept connection expires"):
        m.handle(EXPIRED, 8.0)  # nothing kept any more
    segment_request(m, 8.0, OPEN, Answered(200, reusable=True), Completed(200, keep=True))
    assert (m.handle(DRAINED, 9.0), m.kept_until) == (DONE, None)  # the shell closes it as it returns


def test_a_failure_forgets_the_kept_connection_and_the_resend_rules_are_unchanged():
    m = Lifecycle("http://x/init.m4s", SETTINGS, cmaf.PATH_SCHEMES["template"].plan, jitter=lambda: 0.0)
    for event, action in [(WORK, OPEN), (OPENED, SEND_HEAD_AND_HEADER), (HEADER_SENT, Finish("header", 3.0)),
                          (Answered(200, reusable=True), Completed(200, keep=True))]:  # fmt: skip
        assert m.handle(event, 0.0) == action
    segment_request(m, 1.0, OPEN_REUSED, Failed(EndpointError("http://x/1.m4s", "reset")), Rewind)
    assert m.kept_until is None
    assert isinstance(m.handle(Rewound(stopping=False), 1.0), BackOff)
    assert m.handle(BACKED_OFF, 1.0) == WAIT_FOR_WORK
    # A new connection, counted as a reconnect, and the header alone first, as before keep-alive.
    for event, action in [(WORK, OPEN_AFTER_FAILURE), (OPENED, SEND_HEAD_AND_HEADER),
                          (HEADER_SENT, Finish("header", 3.0))]:  # fmt: skip
        assert m.handle(event, 1.5) == action


def test_a_per_stream_plan_never_keeps_a_connection():
    """Smooth: one long POST per connection, as before (the probe's Connection: close, a new
    connection per POST), even when the server would keep it."""
    m = Lifecycle("http://x/Streams(video)", SETTINGS, SMOOTH, jitter=lambda: 0.0)
    for event, action in [(WORK, PROBE), (Answered(200, reusable=True), OPEN), (OPENED, SEND_HEAD_AND_HEADER),
                          (HEADER_SENT, NEXT), (DRAINED, Finish("end_of_stream", 3.0)),
                          (Answered(200, reusable=True), Completed(200))]:  # fmt: skip
        assert m.handle(event, 0.0) == action
    assert m.kept_until is None


def test_the_connect_timeout_is_about_one_segment_duration_per_segment_and_10_s_per_stream():
    segment = cmaf.PATH_SCHEMES["template"].plan
    for seconds, connect, keepalive in [(2.0, 2.0, 6.0), (6.0, 6.0, 18.0), (0.5, 1.0, 1.5), (20.0, 20.0, 30.0)]:
        settings = PublisherSettings.for_fragment_duration(seconds)
        assert (settings.segment_connect_timeout, settings.keepalive_timeout) == (connect, keepalive)
        assert Lifecycle("http://x/init.m4s", settings, segment).connect_timeout == connect
        assert Lifecycle("http://x/Streams(video)", settings, SMOOTH).connect_timeout == 10.0  # spec 7.1
    overridden = PublisherSettings.for_fragment_duration(2.0, segment_connect_timeout=0.75, keepalive_timeout=4.0)
    assert (overridden.segment_connect_timeout, overridden.keepalive_timeout) == (0.75, 4.0)


def test_a_header_alone_goes_with_one_request_per_segment_only():
    with pytest.raises(ValueError, match="goes with one request per segment"):
        RequestPlan(per="stream", probe_first=True, header_on_every_request=True, path="/Streams({stream})",
                    header_alone=True)  # fmt: skip
    with pytest.raises(ValueError, match="goes with one request per segment"):
        RequestPlan(per="segment", probe_first=False, header_on_every_request=True, path="/{stream}/{track}",
                    header_alone=True)  # fmt: skip


# --- a stream of several tracks -----------------------------------------------------------------


async def test_each_track_of_a_stream_has_its_own_publisher_path_and_header(autojump_clock):
    profile = parse_profile(TWO_TRACKS, now_ns=NOW_NS)
    stream = profile.streams[0]
    source = SyntheticStream(profile, stream)
    endpoint = MemoryEndpoint()
    fanout = FanOut("primary", Metrics())
    board = fanout.add_stream(stream.id)
    board.announce(source.header)
    reboxer = Reboxer(profile.presentation.epoch_ns)
    target = Endpoint(name="memory", region="test", url=BASE, format="cmaf", cmaf_paths="template")
    tracks = list(zip(profile.track_ids(stream), ["video_360p", "audio_eng"], strict=True))
    publishers = add_cmaf_publishers(fanout, board, tracks, target, reboxer=reboxer, limits=LIMITS,
                                     metrics=fanout.metrics, settings=SETTINGS, connector=endpoint)  # fmt: skip
    assert [p.labels[0] for p in publishers] == ["video-video_360p", "video-audio_eng"]  # distinct metric series
    async with trio.open_nursery() as nursery:
        for publisher in publishers:
            nursery.start_soon(publisher.run)
        for k in range(2):
            for fragment in source.fragment(K + k):
                fanout.fragment(fragment)
        with trio.fail_after(60):
            await endpoint.wait_for(lambda: sum(r.status == 200 for r in endpoint.requests) == 6)
        nursery.cancel_scope.cancel()
    segmenter = cmaf.Segmenter(profile.presentation.epoch_ns)
    headers = segmenter.track_headers(source.header)
    expected = {f"/in/v1/group/1/channel/video/{name}/init.m4s": headers[track_id][1].data
                for track_id, name in tracks}  # fmt: skip
    for k in range(2):
        for fragment, (_, name) in zip(source.fragment(K + k), tracks, strict=True):
            expected[f"/in/v1/group/1/channel/video/{name}/{K + k}.m4s"] = segmenter.segment(fragment)
    assert {r.path.decode(): r.body for r in endpoint.requests} == expected
    assert len(endpoint.requests) == 6  # each once
    # Each track's header is that track alone.
    assert [[t.track_id for t in headers[track_id][1].tracks] for track_id, _ in tracks] == [[1], [2]]


async def test_the_end_of_the_stream_sends_the_newest_segment_again_with_lmsg(autojump_clock):
    rig = Rig(MemoryEndpoint())
    returned = trio.Event()

    async def publish():
        await rig.publisher.run()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        rig.push(0, 1)
        rig.fanout.close()  # a graceful stop: what is pending goes out, then the publisher returns
        with trio.fail_after(60):
            await returned.wait()
    assert rig.sent() == [(HEADER_PATH, rig.header, 200), (segment_path(0), rig.segment(0), 200),
                          (segment_path(1), rig.segment(1), 200),
                          (segment_path(1), cmaf.mark_last(rig.segment(1)), 200)]  # fmt: skip
    assert cmaf.split_segment(rig.sent()[-1][1]).last


@needs_mp4box
async def test_mp4box_js_reads_every_request_a_cmaf_publisher_sends(autojump_clock):
    """What the publisher puts on the wire (header, each segment, the lmsg resend at the end), read
    by mp4box.js: each body whole, each segment's mfhd the index in its path."""
    rig = Rig(MemoryEndpoint())
    returned = trio.Event()

    async def publish():
        await rig.publisher.run()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        rig.push(0, 1, 2)
        rig.fanout.close()
        with trio.fail_after(60):
            await returned.wait()
    sent = rig.sent()
    assert [path for path, _, _ in sent] == [HEADER_PATH, *(segment_path(k) for k in (0, 1, 2, 2))]
    header, *segments = mp4box(*(body for _, body, _ in sent))
    assert header.types == ["ftyp", "moov"]
    assert header.tracks[0]["id"] == 1
    for (path, _, _), segment in zip(sent[1:], segments, strict=True):
        assert segment.types == ["styp", "prft", "moof", "mdat"]
        assert segment.boxes[2].one("mfhd")["sequence_number"] == int(path.rsplit("/", 1)[1].removesuffix(".m4s"))
    assert [("lmsg" in s.boxes[0]["compatible_brands"]) for s in segments] == [False, False, False, True]
