"""The group encoder on trio's autojump clock: fragments released when due, restarts that continue
the timeline (crash, stall, wall clock stepped back, process restart), graceful finish."""

from __future__ import annotations

import itertools
import logging
from fractions import Fraction
from functools import partial
from pathlib import Path

import pytest
import trio

from orchestrator.clock import fragment_due_ns, live_index
from orchestrator.encode.continuity import ClockIdentity, decode_state
from orchestrator.encode.group import GroupEncoder, RestartPolicy
from orchestrator.encode.instance import Sink, run_synthetic_encoder
from orchestrator.encode.statefile import read_state
from orchestrator.encode.synthetic import SharedFragments
from orchestrator.errors import EncoderError
from orchestrator.fmp4.stream import EncodedFragment
from orchestrator.ops.metrics import Metrics
from orchestrator.ops.state import EncoderState, PublisherState
from orchestrator.profile import load_profile
from orchestrator.push.fanout import FanOut
from orchestrator.push.handoff import EndpointOutbox
from orchestrator.push.outbox import OutboxLimits
from orchestrator.wallclock import TrioWallClock

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
START_NS = 1_795_000_000_123_456_789  # 2026-11-18, mid-fragment
BIG = OutboxLimits(max_seconds=Fraction(3600), max_bytes=10**9)


class SteppableWall(TrioWallClock):
    """Wall time that an operator's NTP mistake can step backwards."""

    def step(self, seconds: float) -> None:
        self._origin_ns += round(seconds * 1e9)


class Rig:
    """One group ("primary") of the demo profile, one endpoint outbox per stream."""

    def __init__(self, runner_factory, *, limits=BIG, state_dir=None, restored=None, wall=None, stall_after=None):
        self.profile = load_profile(DEMO)
        self.wall = wall or TrioWallClock(START_NS)
        self.metrics = Metrics()
        self.outboxes = {s.id: EndpointOutbox(limits) for s in self.profile.streams}
        fanout = FanOut("primary", self.metrics)
        for s in self.profile.streams:
            state = PublisherState("primary", s.id, "a")
            fanout.add_route(s.id, self.outboxes[s.id], state, (s.id, "primary", "a", "eu"))
        self.headers = fanout.boards
        self.encoder = GroupEncoder(
            group="primary", profile=self.profile, runner=runner_factory(self), fanout=fanout,
            states={s.id: EncoderState("primary", s.id) for s in self.profile.streams},
            metrics=self.metrics, wall=self.wall, restored=restored, state_dir=state_dir, stall_after=stall_after,
            restart=RestartPolicy(base=0.5, cap=2.0))  # fmt: skip
        self.clocks = self.encoder.clocks

    def synthetic(self, first_index: int, sink: Sink):
        return run_synthetic_encoder(self.profile, first_index, sink, wall=self.wall)

    def sent(self, stream="video") -> list[EncodedFragment]:
        out = []
        while (item := self.outboxes[stream].outbox.take()) is not None:
            out.append(item.fragment)
        return out

    def metric(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels) or 0

    async def run_for(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self.encoder.run()


def synthetic(rig):
    return rig.synthetic


def assert_on_clock_and_increasing(rig, fragments, stream="video"):
    clock = rig.clocks[stream][0]
    indices = [f.index for f in fragments]
    assert indices == sorted(set(indices)), "an index repeated or went backwards"
    for f in fragments:
        assert (f.start, f.duration) == (clock.start(f.index), clock.duration(f.index))


async def test_fragments_are_released_when_due_on_every_stream(autojump_clock):
    rig = Rig(synthetic)
    first = live_index(rig.clocks["video"], START_NS)
    released = []

    async def watch():
        while True:
            await rig.outboxes["video"].wait_for_work()
            item = rig.outboxes["video"].outbox.take()
            released.append((item.fragment.index, rig.wall.now_ns()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await rig.run_for(60)  # 30 fragments of 2 s, instantly on the autojump clock
        nursery.cancel_scope.cancel()
    assert [index for index, _ in released] == list(range(first, first + 30))
    for index, at_ns in released:
        due = max(fragment_due_ns(clocks, index) for clocks in rig.clocks.values())  # every stream complete
        assert due <= at_ns < due + 1_000_000  # released within a millisecond of being due
    assert [f.index for f in rig.sent("audio")] == list(range(first, first + 30))
    assert rig.headers["video"].header is not None
    assert rig.metric("orchestrator_fragments_encoded_total", stream="video", group="primary") == 30
    assert rig.metric("orchestrator_fragments_encoded_total", stream="audio", group="primary") == 30
    for stream in ("video", "audio"):
        assert rig.metric("orchestrator_last_encoded_fragment_index", stream=stream, group="primary") == first + 29


async def test_a_stuck_endpoint_keeps_only_the_newest_fragments_and_counts_the_rest(autojump_clock):
    rig = Rig(synthetic, limits=OutboxLimits(max_seconds=Fraction(7), max_bytes=10**9))  # 3 fragments of ~2 s
    await rig.run_for(20)  # 10 fragments, nobody takes any
    kept = rig.sent()
    assert len(kept) == 3
    assert kept[-1].index - kept[0].index == 2
    assert rig.metric("orchestrator_dropped_fragments_total", stream="video", group="primary", endpoint="a",
                      endpoint_region="eu") == 7  # fmt: skip


async def test_a_crashed_instance_is_restarted_and_continues_the_index(autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    starts = []

    def crashing(rig):
        async def run(first_index, sink):
            starts.append(first_index)
            if len(starts) < 3:
                emitted = []

                class Counting(Sink):
                    def header(self, header):
                        sink.header(header)

                    def fragment(self, fragment):
                        sink.fragment(fragment)
                        emitted.append(fragment)
                        if len(emitted) == 6:  # 3 fragments x 2 streams
                            raise EncoderError("encoder blew up")

                await rig.synthetic(first_index, Counting())
            await rig.synthetic(first_index, sink)

        return run

    rig = Rig(crashing)
    await rig.run_for(40)
    video = rig.sent()
    assert_on_clock_and_increasing(rig, video)
    assert [f.index for f in video] == list(range(video[0].index, video[0].index + 20))  # no gap, no repeat
    assert starts == [starts[0], starts[0] + 3, starts[0] + 6]
    assert rig.metric("orchestrator_encoder_restarts_total", group="primary", reason="crashed") == 2
    assert any("encoder.restarting" in r.getMessage() and "reason=crashed" in r.getMessage() for r in caplog.records)


async def test_a_stalled_instance_is_restarted_after_the_stall_window(autojump_clock):
    def stalling(rig):
        async def run(first_index, sink):
            if rig.encoder.restarts == 0:
                sink.header(_header(rig, "video"))
                await trio.sleep_forever()  # a hung encoder: no fragment, no exit
            await rig.synthetic(first_index, sink)

        return run

    rig = Rig(stalling)
    await rig.run_for(30)
    assert rig.metric("orchestrator_encoder_restarts_total", group="primary", reason="stalled") == 1
    video = rig.sent()
    assert_on_clock_and_increasing(rig, video)
    # Stalled for the window (3 x 2 s) plus the allowance for the fragment in flight.
    assert 8 <= len(video) <= 12


def _header(rig, stream_id):
    from orchestrator.encode.synthetic import SyntheticStream

    return SyntheticStream(rig.profile, rig.profile.stream(stream_id)).header


async def test_off_clock_fragments_are_rejected_and_counted(autojump_clock):
    def shifting(rig):
        async def run(first_index, sink):
            class Shift(Sink):
                def header(self, header):
                    sink.header(header)

                def fragment(self, f):
                    if f.index % 2:  # every other fragment one frame late: an encoder bug
                        f = EncodedFragment(f.stream_id, f.track_id, f.index, f.start + 1, f.duration, f.timescale,
                                            f.data)  # fmt: skip
                    sink.fragment(f)

            await rig.synthetic(first_index, Shift())

        return run

    rig = Rig(shifting)
    await rig.run_for(20)
    video = rig.sent()
    assert video
    assert all(f.index % 2 == 0 for f in video)
    assert rig.metric("orchestrator_encoder_rejected_fragments_total", stream="video", group="primary",
                      reason="off_clock") == 5  # fmt: skip


async def test_after_the_wall_clock_steps_back_the_restart_waits_instead_of_reissuing(autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    wall = SteppableWall(START_NS)

    def crash_once_then_step_back(rig):
        async def run(first_index, sink):
            if rig.encoder.restarts == 0:
                with trio.move_on_after(10):
                    await rig.synthetic(first_index, sink)
                wall.step(-20)  # NTP steps the clock back 20 s, then the encoder dies
                raise EncoderError("died")
            await rig.synthetic(first_index, sink)

        return run

    rig = Rig(crash_once_then_step_back, wall=wall)
    await rig.run_for(60)
    video = rig.sent()
    assert_on_clock_and_increasing(rig, video)
    indices = [f.index for f in video]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # continuous across the step
    assert any("encoder.waiting_for_clock" in r.getMessage() for r in caplog.records)


async def test_state_is_persisted_and_a_new_process_continues_after_it(autojump_clock, tmp_path):
    first_run = Rig(synthetic, state_dir=tmp_path)
    await first_run.run_for(11)  # fragments complete at ~2 s intervals
    last = first_run.sent()[-1].index
    p = first_run.profile.presentation
    identity = ClockIdentity(p.name, p.epoch_ns, p.fragment_duration)
    restored = decode_state(read_state(tmp_path, "demo.primary"), identity, "primary")
    # The state covers everything that reached a publisher (it is written first). It may be
    # ahead of it: fragments accepted while the last write ran were never released.
    assert set(restored) == {"video", "audio"}
    persisted = restored["video"][0]
    assert persisted >= last
    assert restored["audio"] == [persisted]

    # The "new process" starts within the same fragment period (a fast pod restart): without the
    # state it would start at the live index, which the old process already emitted.
    second_run = Rig(synthetic, state_dir=tmp_path, restored=restored,
                     wall=TrioWallClock(first_run.wall.now_ns()))  # fmt: skip
    await second_run.run_for(6)
    again = second_run.sent()
    assert again[0].index == persisted + 1
    assert_on_clock_and_increasing(second_run, again)


async def test_finish_completes_the_fragment_in_flight_then_stops(autojump_clock):
    rig = Rig(synthetic)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.encoder.run)
        await trio.sleep(7.3)
        in_flight = live_index(rig.clocks["video"], rig.wall.now_ns())
        asked = trio.current_time()
        await rig.encoder.finish(10)
        # Returned once every stream completed the fragment in flight, not after the grace.
        due_ns = max(fragment_due_ns(clocks, in_flight) for clocks in rig.clocks.values())
        assert rig.wall.now_ns() >= due_ns
        assert trio.current_time() - asked < 2  # a fragment is 2 s
    video = rig.sent()
    assert video[-1].index == in_flight
    assert [f.index for f in rig.sent("audio")][-1] == in_flight


@pytest.mark.parametrize("stall_after", [4.0])
async def test_the_restart_backoff_grows_and_is_capped(autojump_clock, stall_after):
    starts = []

    def always_failing(rig):
        async def run(first_index, sink):
            starts.append(trio.current_time())
            raise EncoderError("cannot start")

        return run

    rig = Rig(always_failing, stall_after=stall_after)
    await rig.run_for(15)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
    assert gaps[:4] == [0.0, 0.5, 1.0, 2.0]
    assert set(gaps[4:]) == {2.0}


async def test_with_a_state_dir_no_fragment_reaches_a_publisher_before_the_state_covers_it(
    mock_clock, tmp_path, monkeypatch
):
    import json

    # Jump only after 50 ms of real idleness, so the state writes (worker threads) finish first.
    mock_clock.autojump_threshold = 0.05

    import orchestrator.encode.group as encoder_module

    events = []
    real_write = encoder_module.write_state

    def recording_write(directory, name, data):
        real_write(directory, name, data)
        streams = json.loads(data)["streams"]
        events.append(("state", {s: [t["index"] for t in e["tracks"]] for s, e in streams.items()}))

    real_push = EndpointOutbox.push

    def recording_push(self, fragment):
        events.append(("push", fragment))
        return real_push(self, fragment)

    monkeypatch.setattr(encoder_module, "write_state", recording_write)
    monkeypatch.setattr(EndpointOutbox, "push", recording_push)
    rig = Rig(synthetic, state_dir=tmp_path)
    await rig.run_for(12)
    covered: dict[tuple[str, int], int] = {}
    pushes = 0
    for kind, what in events:
        if kind == "state":
            for stream, indices in what.items():
                ids = rig.profile.track_ids(rig.profile.stream(stream))  # the state lists tracks in order
                for track, index in zip(ids, indices, strict=True):
                    covered[(stream, track)] = index
        else:
            pushes += 1
            assert what.index <= covered.get((what.stream_id, what.track_id), -1), what
    assert pushes >= 8


async def test_an_instance_that_ran_healthy_for_30_s_restarts_at_once_every_time(autojump_clock):
    """RestartPolicy.healthy_after: an instance that ran 30 s or more resets the backoff, so a
    crash every 35 s is restarted at once every time; one that fails after 5 s backs off."""
    starts = []

    def healthy_then_crashing(seconds):
        def factory(rig):
            async def run(first_index, sink):
                starts.append(trio.current_time())
                with trio.move_on_after(seconds):
                    await rig.synthetic(first_index, sink)
                raise EncoderError(f"crashed after {seconds} s")

            return run

        return factory

    rig = Rig(healthy_then_crashing(35.0))
    await rig.run_for(35 * 4 + 1)
    assert [round(b - a, 3) for a, b in itertools.pairwise(starts)] == [35.0, 35.0, 35.0, 35.0]
    assert rig.metric("orchestrator_encoder_restarts_total", group="primary", reason="crashed") == 4

    starts.clear()
    rig = Rig(healthy_then_crashing(5.0))
    await rig.run_for(5 * 4 + 0.5 + 1.0 + 2.0 + 0.1)
    assert [round(b - a, 3) for a, b in itertools.pairwise(starts)] == [5.0, 5.5, 6.0, 7.0]


def test_the_state_write_is_atomic_a_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    from orchestrator.encode.statefile import write_state

    write_state(tmp_path, "demo.primary", b"old")
    assert read_state(tmp_path, "demo.primary") == b"old"

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        write_state(tmp_path, "demo.primary", b"new")
    assert read_state(tmp_path, "demo.primary") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.primary.json"]
    monkeypatch.undo()
    write_state(tmp_path, "demo.primary", b"new")
    assert read_state(tmp_path, "demo.primary") == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.primary.json"]


async def test_a_state_write_failure_is_counted_logged_and_fragments_still_go_out(mock_clock, tmp_path, caplog):
    mock_clock.autojump_threshold = 0.05  # the state writes run in worker threads
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    rig = Rig(synthetic, state_dir=not_a_directory / "state")
    await rig.run_for(7)
    assert rig.metric("orchestrator_state_write_failures_total", group="primary") >= 3
    assert any("encoder.state.write_failed group=primary" in r.getMessage() for r in caplog.records)
    assert len(rig.sent()) >= 3  # sending live matters more than the state file


async def test_encoder_up_is_1_while_the_instance_runs_and_0_between_instances(autojump_clock):
    seen = []

    def crash_once(rig):
        async def run(first_index, sink):
            seen.append(rig.metric("orchestrator_encoder_up", group="primary"))
            if len(seen) == 1:
                raise EncoderError("first instance dies")
            await rig.synthetic(first_index, sink)

        return run

    rig = Rig(crash_once)
    encoder_up = []

    async def watch():
        while True:
            encoder_up.append(rig.metric("orchestrator_encoder_up", group="primary"))
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await rig.run_for(5)
        nursery.cancel_scope.cancel()
    assert seen == [1, 1]
    assert encoder_up[-1] == 1
    assert rig.metric("orchestrator_encoder_up", group="primary") == 0  # run() ended: no instance


async def test_indices_skipped_by_a_restarted_instance_are_counted_once_per_stream(autojump_clock, caplog):
    starts = []

    def skipping(rig):
        async def run(first_index, sink):
            starts.append(first_index)
            if len(starts) == 1:
                emitted = []

                class CrashAfterTwo(Sink):
                    def header(self, header):
                        sink.header(header)

                    def fragment(self, fragment):
                        sink.fragment(fragment)
                        emitted.append(fragment)
                        if len(emitted) == 4:  # 2 fragments x 2 streams
                            raise EncoderError("crash")

                await rig.synthetic(first_index, CrashAfterTwo())
            await rig.synthetic(first_index + 3, sink)  # comes back three fragments later

        return run

    rig = Rig(skipping)
    await rig.run_for(20)
    video = [f.index for f in rig.sent()]
    assert video[:3] == [starts[0], starts[0] + 1, starts[1] + 3]
    for stream in ("video", "audio"):
        assert rig.metric("orchestrator_encoder_skipped_fragments_total", stream=stream, group="primary") == 3


class _Collect(Sink):
    def __init__(self) -> None:
        self.fragments: list = []

    def header(self, header) -> None:
        pass

    def fragment(self, fragment) -> None:
        self.fragments.append(fragment)


async def test_groups_of_one_process_share_each_synthetic_fragment_object(autojump_clock):
    """A fragment pushed to every endpoint of both groups is one object (the memory formula of docs/scale.md, C = 1)."""
    profile = load_profile(DEMO)
    shared = SharedFragments()
    sinks = [_Collect(), _Collect()]
    first = max(live_index([profile.track_clock(t) for t in s.tracks], START_NS) for s in profile.streams)
    async with trio.open_nursery() as nursery:
        for sink in sinks:
            nursery.start_soon(partial(run_synthetic_encoder, profile, first, sink, wall=TrioWallClock(START_NS),
                                       shared=shared))  # fmt: skip
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    primary, backup = sinks
    assert (
        len(primary.fragments) == len(backup.fragments) >= len(profile.streams) * 9
    )  # one track per stream, 20 s of 2 s fragments
    assert all(a is b for a, b in zip(primary.fragments, backup.fragments, strict=True))
    assert len(shared._by_key) <= shared.keep * len(profile.streams)  # only the last few indices are kept
