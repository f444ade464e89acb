"""The supervisor's promises across publishers and signals, on real loopback sockets.

* Other endpoints never wait for a slow one: a group with two endpoints, one stuck (a black
  hole from the start), keeps the healthy one live, fragment after fragment, while the stuck
  one's backlog grows (and its metrics say so).
* A second signal cancels at once: ``up`` whose graceful stop would wait for an endpoint that
  never answers returns within a second of the second SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry
from test_integration import wait_until

from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.profile import parse_profile
from orchestrator.push.publisher import PublisherSettings
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.supervisor import UpOptions, run_up
from orchestrator.testing.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

PROFILE = """
[presentation]
name = "two"
fragment_duration = 2
epoch = 2026-01-01T00:00:00Z

[[streams]]
id = "av"
  [[streams.tracks]]
  kind = "video"
  name = "video"
  bitrate = 800_000
  width = 640
  height = 360
  frame_rate = 25
  [[streams.tracks]]
  kind = "audio"
  name = "audio"
  bitrate = 128_000
  sample_rate = 48000
  channels = 2

[groups.primary]
encoder = {{ backend = "synthetic" }}
  [[groups.primary.endpoints]]
  name = "healthy"
  region = "a"
  url = "http://127.0.0.1:{healthy}/live/two.isml"
  [[groups.primary.endpoints]]
  name = "stuck"
  region = "b"
  url = "http://127.0.0.1:{stuck}/live/two.isml"

[groups.backup]
encoder = {{ backend = "synthetic" }}
  [[groups.backup.endpoints]]
  name = "healthy"
  region = "a"
  url = "http://127.0.0.1:{healthy}/live/two.isml"

[metrics]
enabled = false
"""


async def test_other_endpoints_never_wait_for_a_stuck_one(tmp_path):
    registry = CollectorRegistry()
    settings = PublisherSettings(connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
                                 retry=RetryPolicy(base=0.2, cap=1.0, jitter=0.0))  # fmt: skip
    async with trio.open_nursery() as nursery:
        app = IngestApp(tmp_path / "archive")
        _, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
        proxy = FaultProxy(("127.0.0.1", port))
        _, proxy_port = await nursery.start(proxy.run)
        proxy.set_fault(Fault.BLACKHOLE)  # stuck from the start: accepts, never answers
        profile = parse_profile(PROFILE.format(healthy=port, stuck=proxy_port), "two.toml")
        options = UpOptions(groups=["primary"], status="off", handle_signals=False, shutdown_grace=3.0,
                            publisher_settings=settings)  # fmt: skip
        async with trio.open_nursery() as up:
            running = await up.start(lambda task_status: run_up(profile, options, registry=registry,
                                                                task_status=task_status))  # fmt: skip

            def value(name, endpoint, **extra):
                labels = {"stream": "av", "group": "primary", "endpoint": endpoint,
                          "endpoint_region": "a" if endpoint == "healthy" else "b", **extra}  # fmt: skip
                return registry.get_sample_value(name, labels)

            # Sample for 12 s (6 fragments): the healthy endpoint is never more than one fragment
            # duration (plus a second of slack) behind, whatever the stuck one does.
            worst = 0.0
            deadline = trio.current_time() + 12
            while trio.current_time() < deadline:
                await trio.sleep(0.25)
                since = value("orchestrator_seconds_since_last_push", "healthy", presentation="two")
                if since is not None:
                    worst = max(worst, since)
            backlog = {kind: value(f"orchestrator_backlog_{kind}", "stuck") for kind in ("fragments", "bytes",
                                                                                        "seconds")}  # fmt: skip
            stuck_since = value("orchestrator_seconds_since_last_push", "stuck", presentation="two")
            healthy_backlog = value("orchestrator_backlog_fragments", "healthy")
            encoder_up = registry.get_sample_value("orchestrator_encoder_up", {"group": "primary"})
            running.stop.set()
        proxy.heal()
        nursery.cancel_scope.cancel()
    assert 0 < worst <= 2.0 + 1.0, f"the healthy endpoint waited {worst:.1f} s between pushes"
    assert healthy_backlog == 0
    assert encoder_up == 1
    assert registry.get_sample_value("orchestrator_encoder_up", {"group": "primary"}) == 0  # stopped
    assert stuck_since >= 12  # never pushed anything: the age since the start, which an off-air alert sees
    # Two tracks per fragment index; ~6 indices produced, a few possibly taken into the dead POST.
    assert backlog["fragments"] >= 6
    assert backlog["bytes"] > 0
    assert backlog["seconds"] >= 4.0
    status = app.point.status()["publishing_points"]["live/two"]["streams"]["av"]["tracks"]
    for track in status.values():
        assert track["gaps"] == 0
        assert track["fragments_archived"] >= 5


def test_a_second_signal_cancels_at_once(tmp_path: Path):
    """The first SIGTERM starts a graceful stop that would wait (up to the 10 s grace) for an
    endpoint that accepts connections and never answers; the second cancels everything now."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # never accepted: connections complete, nothing is ever answered
        port = hole.getsockname()[1]
        text = PROFILE.format(healthy=port, stuck=port).replace(
            "[metrics]\nenabled = false", "[metrics]\nenabled = false"
        )
        profile = tmp_path / "two.toml"
        profile.write_text(text)
        log = tmp_path / "up.log"
        with log.open("wb") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "up", str(profile), "--group", "primary", "--status", "log"],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        try:
            wait_until(lambda: "encoder.started" in log.read_text(), 40, "the group to start", [log])
            time.sleep(2.5)  # a fragment is queued for the silent endpoint
            up.send_signal(signal.SIGTERM)
            wait_until(lambda: "supervisor.stopping" in log.read_text(), 10, "the graceful stop to begin", [log])
            time.sleep(0.5)
            second = time.monotonic()
            up.send_signal(signal.SIGTERM)
            code = up.wait(10)
            took = time.monotonic() - second
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    text = log.read_text()
    assert "supervisor.signal signal=SIGTERM action=graceful_stop" in text
    assert "supervisor.signal signal=SIGTERM action=cancel_now" in text
    assert took < 1.5, f"stopped {took:.1f} s after the second signal"
    assert code == 0, text[-3000:]
