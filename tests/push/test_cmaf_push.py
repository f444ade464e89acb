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

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.httpserve import serve_asgi
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile, parse_profile
from orchestrator.push.cmafroute import Reboxer, add_cmaf_publishers
from orchestrator.push.fanout import FanOut
from orchestrator.push.lifecycle import (
    HEADER_SENT,
    NEXT,
    OPENED,
    READY,
    SEND_FRAGMENT,
    WORK,
    WRITTEN_NEW,
    Answered,
    Completed,
    Finish,
    Lifecycle,
    Open,
    PublisherSettings,
    Rewind,
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


def test_a_header_alone_goes_with_one_request_per_segment_only():
    with pytest.raises(ValueError, match="goes with one request per segment"):
        RequestPlan(per="stream", probe_first=True, header_on_every_request=True, path="/Streams({stream})",
                    header_alone=True)  # fmt: skip
    with pytest.raises(ValueError, match="goes with one request per segment"):
        RequestPlan(per="segment", probe_first=False, header_on_every_request=True, path="/{stream}/{track}",
                    header_alone=True)  # fmt: skip


# --- a stream of several tracks -----------------------------------------------------------------

TWO_TRACKS = DEMO.read_text().replace(
    """  frame_rate = "30000/1001"
""",
    """  frame_rate = "30000/1001"
  [[streams.tracks]]
  kind = "audio"
  name = "audio_eng"
  bitrate = 128_000
  sample_rate = 48000
  channels = 2
  language = "eng"
""",
    1,
)


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
