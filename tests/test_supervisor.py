"""The supervisor's promises across publishers and signals, on real loopback sockets.

* Other endpoints never wait for a slow one: a group with two endpoints, one stuck (a black
  hole from the start), keeps the healthy one live, fragment after fragment, while the stuck
  one's backlog grows (and its metrics say so).
* A second signal cancels at once: ``up`` whose graceful stop would wait for an endpoint that
  never answers returns within a second of the second SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry
from rig import audio, build_profile, endpoint, group, loopback_ingest, up_in_process, video, wait_until, write_profile

from orchestrator.push.publisher import PublisherSettings
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.testing.faultproxy import Fault

pytestmark = pytest.mark.integration


def two(healthy: int, stuck: int) -> dict:
    """The profile's keys: one stream, video and audio; the primary pushes to a healthy and a
    stuck endpoint, the backup to the healthy one."""
    return {
        "name": "two",
        "streams": {"av": [video("video", frame_rate=25), audio("audio")]},
        "groups": {
            "primary": group(endpoint(healthy, name="healthy", region="a"), endpoint(stuck, name="stuck", region="b")),
            "backup": group(endpoint(healthy, name="healthy", region="a")),
        },
    }


async def test_other_endpoints_never_wait_for_a_stuck_one(tmp_path):
    registry = CollectorRegistry()
    settings = PublisherSettings(connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
                                 retry=RetryPolicy(base=0.2, cap=1.0, jitter=0.0))  # fmt: skip
    async with loopback_ingest(tmp_path / "archive", proxy=True) as loopback:
        app, proxy = loopback.app, loopback.proxy
        assert proxy is not None
        assert loopback.proxy_port is not None
        proxy.set_fault(Fault.BLACKHOLE)  # stuck from the start: accepts, never answers
        profile = build_profile(**two(healthy=loopback.port, stuck=loopback.proxy_port))
        async with up_in_process(profile, registry, groups=["primary"], shutdown_grace=3.0,
                                 publisher_settings=settings):  # fmt: skip

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
            proxy.heal()  # the graceful stop need not wait out the stuck endpoint
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


def test_a_second_signal_cancels_at_once(tmp_path: Path, up_process):
    """The first SIGTERM starts a graceful stop that would wait (up to the 10 s grace) for an
    endpoint that accepts connections and never answers; the second cancels everything now."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # never accepted: connections complete, nothing is ever answered
        port = hole.getsockname()[1]
        profile = write_profile(tmp_path / "two.toml", **two(healthy=port, stuck=port))
        orchestrator = up_process(profile, "--group", "primary", ready="encoder.started", timeout=40)
        up, log = orchestrator.process, orchestrator.log
        time.sleep(2.5)  # a fragment is queued for the silent endpoint
        up.send_signal(signal.SIGTERM)
        wait_until(lambda: "supervisor.stopping" in log.read_text(), 10, "the graceful stop to begin", [log])
        time.sleep(0.5)
        second = time.monotonic()
        up.send_signal(signal.SIGTERM)
        code = up.wait(10)
        took = time.monotonic() - second
    text = log.read_text()
    assert "supervisor.signal signal=SIGTERM action=graceful_stop" in text
    assert "supervisor.signal signal=SIGTERM action=cancel_now" in text
    assert took < 1.5, f"stopped {took:.1f} s after the second signal"
    assert code == 0, text[-3000:]
