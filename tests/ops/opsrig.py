"""The ops tests' kit: a sample live state (three publishers, one failing) at fixed clocks, for
the pure status and view tests; and a real ``up`` in-process: synthetic encoder, a real ingest
server, the primary's second endpoint (region-b, us-east) behind the project's fault proxy,
metrics on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from fractions import Fraction
from pathlib import Path

from rig import build_profile, endpoint, group, loopback_ingest, up_in_process

from orchestrator.ops.state import EncoderState, GroupState, LiveState, PublisherState
from orchestrator.supervisor import Running
from orchestrator.testing.faultproxy import FaultProxy

NOW_WALL = 1_800_000_000.0
NOW_MONO = 5000.0
EPOCH_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z


def live() -> LiveState:
    state = LiveState(presentation="demo", fragment_duration=2.0, epoch_ns=EPOCH_NS,
                      fragment_duration_exact=Fraction(2))  # fmt: skip
    state.groups += [GroupState("primary", up=True, restarts=2, last_exit_code=-9), GroupState("backup", up=True)]
    state.encoders += [EncoderState("primary", "video", last_index=41), EncoderState("backup", "video", 42)]
    a = PublisherState("primary", "video", "region-a", "eu-west", connected=True, last_push_monotonic=NOW_MONO - 1.5)
    b = PublisherState("primary", "video", "region-b", "us-east")
    b.set_connected(False, NOW_WALL - 30)
    b.record_failure("transport", "connection failed: ConnectError", NOW_WALL - 2)
    b.set_backlog(30, 123_456, 28.0)
    c = PublisherState("backup", "video", "region-a", "eu-west", connected=True, last_push_monotonic=NOW_MONO - 0.5)
    state.publishers += [a, b, c]
    return state


@asynccontextmanager
async def ops_up(tmp_path: Path) -> AsyncIterator[tuple[Running, FaultProxy, str]]:
    """Yields the running ``up``, the proxy in front of the primary's region-b, and the base URL
    of the metrics listener; stops ``up`` gracefully on exit."""
    async with loopback_ingest(tmp_path / "archive", proxy=True) as loopback:
        assert loopback.proxy is not None
        assert loopback.proxy_port is not None
        region_a = endpoint(loopback.port, name="region-a", region="eu-west")
        region_b = endpoint(loopback.proxy_port, name="region-b", region="us-east")
        profile = build_profile(name="ops", groups={"primary": group(region_a, region_b), "backup": group(region_a)},
                                metrics={"enabled": True, "listen": "127.0.0.1:0"})  # fmt: skip
        async with up_in_process(profile, shutdown_grace=6.0) as running:
            assert running.metrics_address is not None
            host, port = running.metrics_address
            try:
                yield running, loopback.proxy, f"http://{host}:{port}"
            finally:
                loopback.proxy.heal()
