"""The fan-out: each stream's header to its board, each fragment to every endpoint of its
stream, and what a full outbox drops counted and logged."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.metrics import Metrics
from orchestrator.ops.state import PublisherState
from orchestrator.profile import load_profile
from orchestrator.push.fanout import FanOut
from orchestrator.push.handoff import EndpointOutbox
from orchestrator.push.outbox import OutboxLimits

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
K = 14_080_000
WIDE = OutboxLimits(max_seconds=Fraction(60), max_bytes=10**9)


def route(fanout: FanOut, stream: str, endpoint: str, limits: OutboxLimits = WIDE) -> EndpointOutbox:
    outbox = EndpointOutbox(limits)
    fanout.add_route(stream, outbox, PublisherState("primary", stream, endpoint), (stream, "primary", endpoint, "eu"))
    return outbox


def pending(outbox: EndpointOutbox) -> list[tuple[str, int, int]]:
    out = []
    while (item := outbox.outbox.take()) is not None:
        out.append((item.fragment.stream_id, item.fragment.track_id, item.fragment.index))
    return out


def test_every_fragment_goes_to_every_endpoint_of_its_stream_and_only_there():
    profile = load_profile(DEMO)
    video, audio = (SyntheticStream(profile, s) for s in profile.streams[:2])
    fanout = FanOut("primary", Metrics())
    a, b = route(fanout, video.stream.id, "a"), route(fanout, video.stream.id, "b")
    c = route(fanout, audio.stream.id, "a")
    fanout.header(video.header)
    fanout.header(audio.header)
    for k in (K, K + 1):
        for fragment in [*video.fragment(k), *audio.fragment(k)]:
            assert fanout.fragment(fragment) == 0
    expected_video = [(video.stream.id, f.track_id, f.index) for k in (K, K + 1) for f in video.fragment(k)]
    assert pending(a) == pending(b) == expected_video
    assert pending(c) == [(audio.stream.id, f.track_id, f.index) for k in (K, K + 1) for f in audio.fragment(k)]
    assert fanout.boards[video.stream.id].header == video.header
    assert fanout.boards[audio.stream.id].header == audio.header
    assert [r.outbox for r in fanout.routes(video.stream.id)] == [a, b]


def test_a_stream_without_routes_is_ignored():
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    fanout = FanOut("primary", Metrics())
    fanout.header(source.header)
    assert fanout.fragment(source.fragment(K)[0]) == 0
    assert fanout.boards == {}


def test_what_a_full_outbox_drops_is_counted_and_logged_for_that_endpoint_only(caplog):
    caplog.set_level(logging.WARNING, logger="orchestrator.push.fanout")
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    metrics = Metrics()
    fanout = FanOut("primary", metrics)
    stream = source.stream.id
    small = route(fanout, stream, "small", OutboxLimits(max_seconds=Fraction(3), max_bytes=10**9))  # one 2 s fragment
    wide = route(fanout, stream, "wide")
    fragments = [f for k in range(K, K + 4) for f in source.fragment(k)]
    tracks = len(source.fragment(K))
    dropped = sum(fanout.fragment(f) for f in fragments)
    assert dropped == 3 * tracks  # all but the newest fragment of each track
    assert [i for _, _, i in pending(small)] == [K + 3] * tracks
    assert len(pending(wide)) == 4 * tracks
    value = metrics.registry.get_sample_value
    labels = {"stream": stream, "group": "primary", "endpoint_region": "eu"}
    assert value("orchestrator_dropped_fragments_total", {**labels, "endpoint": "small"}) == 3 * tracks
    assert value("orchestrator_dropped_fragments_total", {**labels, "endpoint": "wide"}) is None
    small_state = next(r.publisher for r in fanout.routes(stream) if r.outbox is small)
    assert small_state.dropped == 3 * tracks
    lines = [r.getMessage() for r in caplog.records if "publisher.backlog.dropped" in r.getMessage()]
    assert len(lines) == 3 * tracks
    assert f"group=primary stream={stream} endpoint=small index={K} " in lines[0]
    assert lines[0].endswith("reason=backlog_full")


async def test_close_ends_every_stream_after_what_is_pending():
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    fanout = FanOut("primary", Metrics())
    a, b = route(fanout, source.stream.id, "a"), route(fanout, source.stream.id, "b")
    fanout.fragment(source.fragment(K)[0])
    fanout.close()
    for outbox in (a, b):
        assert await outbox.wait_for_work()  # the pending fragment still goes out
        outbox.outbox.take()
        assert not await outbox.wait_for_work()  # then the publisher ends
