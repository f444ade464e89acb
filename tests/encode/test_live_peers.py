"""A live group's agreement with each peer, through the real shell and the real /status: the
peers' /metrics are served by the orchestrator's own listener over loopback, the running check
(ffmpeg._converge, the loop that decides whether to move) reads them, and the group's /status
shows, per stream, agrees / differs by N ticks / other timeline / unreachable for each peer."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import rig
import trio
from prometheus_client import CollectorRegistry

from orchestrator.encode import ffmpeg
from orchestrator.encode.ffmpeg_command import plan_encodes
from orchestrator.encode.lock import LiveLock
from orchestrator.ops.listener import serve_listener
from orchestrator.ops.metrics import Metrics
from orchestrator.ops.state import EncoderState, GroupState, LiveState
from orchestrator.ops.view import lines
from orchestrator.profile import parse_profile
from orchestrator.testing import profiles

OURS = LiveLock(7_363_495_620, 1_796_000_000_123, "backup")  # adopted from the backup


async def serve_peer(nursery: trio.Nursery, exported: dict[str, LiveLock]) -> str:
    """A peer process: its groups' mappings on its /metrics, served by the real listener."""
    metrics = Metrics(CollectorRegistry())
    for group, lock in exported.items():
        metrics.live_lock_offset.labels(group).set(lock.offset)
        metrics.live_lock_established.labels(group, lock.by).set(lock.established_ms)
    _, port = await nursery.start(serve_listener, metrics.registry, LiveState(), "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}/metrics"


async def test_status_shows_the_live_locks_agreement_with_each_peer_read_by_the_running_check(monkeypatch):
    monkeypatch.setattr(ffmpeg, "PEER_CHECK", 0.05)
    groups = {name: profiles.group(profiles.endpoint(port)) for name, port in (("primary", 1), ("backup", 2))}
    profile = parse_profile(profiles.profile_text(groups=groups), "rig.toml")
    async with trio.open_nursery() as nursery:
        backup = await serve_peer(nursery, {"backup": OURS})
        spare = await serve_peer(nursery, {"spare": LiveLock(OURS.offset + 18_000, 1_796_000_000_900, "spare")})
        stale = await serve_peer(nursery, {"old": LiveLock(OURS.offset - 2_700_000, 1_795_000_000_000, "old")})
        gone = f"http://127.0.0.1:{rig.free_port()}/metrics"  # nobody listens
        live = LiveState(presentation="rig", fragment_duration=2.0, groups=[GroupState("primary", up=True)])
        live.encoders = [EncoderState("primary", stream.id, lock="peer") for stream in profile.streams]
        sink = SimpleNamespace(states={e.stream_id: e for e in live.encoders})
        metrics = Metrics(CollectorRegistry())
        output = ffmpeg._Recut(profile, plan_encodes(profile), [], sink, group="primary",  # type: ignore[arg-type]
                               wall=SimpleNamespace(), metrics=metrics)  # fmt: skip
        output.live_lock, output.lock_origin = OURS, "peer"
        nursery.start_soon(lambda: ffmpeg._converge(output, profile, [backup, spare, stale, gone], group="primary",
                                                    metrics=metrics))  # fmt: skip
        await rig.wait_for(lambda: output.peers, 20, "the first peer check")
        _, port = await nursery.start(serve_listener, metrics.registry, live, "127.0.0.1", 0)
        async with httpx.AsyncClient() as client:
            document = (await client.get(f"http://127.0.0.1:{port}/status")).json()
        nursery.cancel_scope.cancel()
    assert output.move_to is None  # ours is the agreed one (the earliest established): no move
    for stream in document["streams"]:
        (group,) = stream["groups"]
        assert group["lock"] == "peer/peer_unreachable"
        assert group["peers"] == [
            {"peer": "backup", "agreement": "agrees", "offset_ticks": None},
            {"peer": "spare", "agreement": "differs", "offset_ticks": 18_000},  # 0.2 s: it will move to ours
            {"peer": "old", "agreement": "other_timeline", "offset_ticks": -2_700_000},  # before a discontinuity
            {"peer": gone, "agreement": "unreachable", "offset_ticks": None},
        ]
    netloc = gone.split("/")[2]
    assert f"lock=peer/peer_unreachable,backup=ok,spare=+18000t,old=other,{netloc}=down" in lines(document)[0]
    assert metrics.registry.get_sample_value("orchestrator_live_peer_up", {"group": "primary", "peer": gone}) == 0
