"""A real ``up`` in-process for the ops tests: synthetic encoder, a real ingest server, the
primary's second endpoint (region-b, us-east) behind the project's fault proxy, metrics on a
free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from faultkit import TEST_SETTINGS
from prometheus_client import CollectorRegistry

from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.profile import parse_profile
from orchestrator.supervisor import Running, UpOptions, run_up
from orchestrator.testing.faultproxy import FaultProxy

PROFILE = """
[presentation]
name = "ops"
fragment_duration = 2
epoch = 2026-01-01T00:00:00Z

[[streams]]
id = "video"
  [[streams.tracks]]
  kind = "video"
  name = "video_360p"
  bitrate = 800_000
  width = 640
  height = 360
  frame_rate = "30000/1001"

[[streams]]
id = "audio"
  [[streams.tracks]]
  kind = "audio"
  name = "audio_eng"
  bitrate = 128_000
  sample_rate = 48000
  channels = 2

[groups.primary]
encoder = {{ backend = "synthetic" }}
  [[groups.primary.endpoints]]
  name = "region-a"
  region = "eu-west"
  url = "http://127.0.0.1:{ingest_port}/live/ops.isml"
  [[groups.primary.endpoints]]
  name = "region-b"
  region = "us-east"
  url = "http://127.0.0.1:{proxy_port}/live/ops.isml"

[groups.backup]
encoder = {{ backend = "synthetic" }}
  [[groups.backup.endpoints]]
  name = "region-a"
  region = "eu-west"
  url = "http://127.0.0.1:{ingest_port}/live/ops.isml"

[metrics]
enabled = true
listen = "127.0.0.1:0"
"""


async def wait_for(predicate, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout) as scope:
        while not await predicate():
            await trio.sleep(0.1)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@asynccontextmanager
async def ops_up(tmp_path: Path) -> AsyncIterator[tuple[Running, FaultProxy, str]]:
    """Yields the running ``up``, the proxy in front of the primary's region-b, and the base URL
    of the metrics listener; stops ``up`` gracefully on exit."""
    async with trio.open_nursery() as nursery:
        app = IngestApp(tmp_path / "archive")
        _, ingest_port = await nursery.start(serve_app, app, "127.0.0.1", 0)
        proxy = FaultProxy(("127.0.0.1", ingest_port))
        _, proxy_port = await nursery.start(proxy.run)
        profile = parse_profile(PROFILE.format(ingest_port=ingest_port, proxy_port=proxy_port), "ops.toml")
        options = UpOptions(status="off", handle_signals=False, shutdown_grace=6.0, publisher_settings=TEST_SETTINGS)
        running = await nursery.start(lambda task_status: run_up(profile, options, registry=CollectorRegistry(),
                                                                 task_status=task_status))  # fmt: skip
        assert running.metrics_address is not None
        host, port = running.metrics_address
        try:
            yield running, proxy, f"http://{host}:{port}"
        finally:
            proxy.heal()
            running.stop.set()
            with trio.fail_after(15):
                while any(p.connected for p in running.publishers):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
