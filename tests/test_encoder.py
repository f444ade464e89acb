"""The encoder instance on trio's autojump clock: fragments released exactly when due."""

from pathlib import Path

import trio

from orchestrator.clock import fragment_due_ns, live_index
from orchestrator.encoder import EncoderState, Output, run_synthetic_encoder
from orchestrator.metrics import Metrics
from orchestrator.profile import load_profile
from orchestrator.publisher import EndpointQueue, PublisherState
from orchestrator.synthetic import SyntheticStream
from orchestrator.wallclock import TrioWallClock

DEMO = Path(__file__).resolve().parent.parent / "profiles" / "demo.toml"
START_NS = 1_795_000_000_123_456_789  # 2026-11-18, mid-fragment


def make_output(max_fragments, labels):
    return Output(EndpointQueue(max_fragments), PublisherState("primary", labels[0], labels[2]), labels)


async def test_releases_consecutive_fragments_when_due(autojump_clock):
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    wall = TrioWallClock(START_NS)
    metrics = Metrics()
    output = make_output(100, ("video", "primary", "a", "eu"))
    state = EncoderState("primary", "video")
    released = []

    async def consume():
        while (fragment := await output.queue.get()) is not None:
            released.append((fragment.index, wall.now_ns()))

    first = live_index(source.clocks, START_NS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        with trio.move_on_after(60):  # 30 fragments of 2 s, instantly on the autojump clock
            await run_synthetic_encoder(source, [output], group="primary", wall=wall, metrics=metrics, state=state)
        output.queue.close()

    assert [index for index, _ in released] == list(range(first, first + 30))
    for index, at_ns in released:
        due = fragment_due_ns(source.clocks, index)
        assert due <= at_ns < due + 1_000_000  # released within a millisecond of being due
    assert state.last_index == first + 29
    assert metrics.registry.get_sample_value(
        "orchestrator_fragments_encoded_total", {"stream": "video", "group": "primary"}) == 30  # fmt: skip


async def test_a_stuck_endpoint_never_blocks_the_encoder_or_the_others(autojump_clock):
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    wall = TrioWallClock(START_NS)
    metrics = Metrics()
    stuck = make_output(3, ("video", "primary", "stuck", "eu"))
    healthy = make_output(3, ("video", "primary", "healthy", "us"))
    got = []

    async def consume():
        while (fragment := await healthy.queue.get()) is not None:
            got.append(fragment.index)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        with trio.move_on_after(20):  # 10 fragments
            await run_synthetic_encoder(
                source, [stuck, healthy], group="primary", wall=wall, metrics=metrics,
                state=EncoderState("primary", "video"))  # fmt: skip
        healthy.queue.close()

    assert len(got) == 10
    assert got == list(range(got[0], got[0] + 10))
    assert [f.index for f in stuck.queue.backlog] == got[-3:]  # the newest three are kept
    dropped = metrics.registry.get_sample_value(
        "orchestrator_queue_dropped_fragments_total",
        {"stream": "video", "group": "primary", "endpoint": "stuck", "region": "eu"})  # fmt: skip
    assert dropped == 7
