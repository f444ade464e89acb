"""The metrics listener's routes on loopback, against a real ``up`` (synthetic encoder, real
ingest server, real sockets): /metrics, /healthz, /readyz (including unready while a group's
encoder is down), /status, 404 and 405."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from faultkit import TEST_SETTINGS
from prometheus_client import CollectorRegistry

from orchestrator import supervisor
from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.profile import parse_profile
from orchestrator.supervisor import UpOptions, run_up
from orchestrator.testing.faultproxy import Fault, FaultProxy

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


@pytest.mark.integration
async def test_routes_readiness_and_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The primary's encoder instance can be broken on demand: the running one fails, and each new
    # one fails at once (a crash loop), until healed. The supervisor restarts it with its backoff.
    broken = trio.Event()
    healed = trio.Event()
    real_runner = supervisor._Planned.runner

    def runner(self, group, wall):
        real = real_runner(self, group, wall)
        if group != "primary":
            return real

        async def breakable(first_index, sink):
            if broken.is_set() and not healed.is_set():
                raise RuntimeError("test: encoder broken")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(real, first_index, sink)
                await broken.wait()
                if not healed.is_set():
                    raise RuntimeError("test: encoder broken")

        return breakable

    monkeypatch.setattr(supervisor._Planned, "runner", runner)
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
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=5) as client:

            async def get(path: str) -> httpx.Response:
                return await client.get(path)

            assert (await get("/healthz")).text == "ok\n"
            # Not ready before the first POSTs stream.
            first = await get("/readyz")
            assert first.status_code == 503
            assert "no endpoint streaming" in first.text

            async def ready() -> bool:
                return (await get("/readyz")).status_code == 200

            await wait_for(ready, 15, "/readyz 200")
            assert (await get("/readyz")).text == "ready\n"

            metrics = await get("/metrics")
            assert metrics.status_code == 200
            assert "orchestrator_endpoint_up{" in metrics.text
            for path in ("/", "/metrics/extra", "/favicon.ico", "/statusz"):
                missing = await get(path)
                assert missing.status_code == 404, path
            assert (await client.post("/status")).status_code == 405
            head = await client.head("/status")
            assert head.status_code == 200
            assert head.content == b""

            # region-b of the primary goes down: still ready (each stream has an endpoint), and
            # /status says which endpoint, where, and why.
            proxy.set_fault(Fault.DOWN)

            async def region_b_reconnecting() -> bool:
                doc = (await get("/status")).json()
                video = next(s for s in doc["streams"] if s["stream"] == "video")
                primary = next(g for g in video["groups"] if g["group"] == "primary")
                return any(e["endpoint"] == "region-b" and e["state"] == "reconnecting" for e in primary["endpoints"])

            await wait_for(region_b_reconnecting, 15, "region-b reconnecting in /status")
            response = await get("/status")
            assert response.headers["content-type"].startswith("application/json")
            doc = json.loads(response.text)
            assert doc["presentation"] == "ops"
            assert doc["fragment_duration"] == 2.0
            assert doc["ready"] is True
            assert doc["groups"]["primary"]["encoder_up"] is True
            assert [s["stream"] for s in doc["streams"]] == ["video", "audio"]
            video = doc["streams"][0]
            assert [g["group"] for g in video["groups"]] == ["primary", "backup"]
            primary = video["groups"][0]
            a, b = primary["endpoints"]
            assert [a[k] for k in ("endpoint", "region", "state", "connected")] == ["region-a", "eu-west", "streaming",
                                                                                    True]  # fmt: skip
            assert [b[k] for k in ("endpoint", "region", "state", "connected")] == ["region-b", "us-east",
                                                                                    "reconnecting", False]  # fmt: skip
            assert "connection" in b["last_error"]
            assert doc["time"] - 15 < b["last_error_at"] <= doc["time"]
            assert b["failures"] >= 1
            assert a["last_index"] is not None
            assert doc["time"] - 3 * 2 < a["last_push_at"] <= doc["time"]
            assert video["last_index"] >= a["last_index"]
            for key in ("backlog_seconds", "backlog_bytes", "backlog_fragments", "dropped", "resent", "reconnects"):
                assert key in b

            async def backlog_grows() -> bool:
                doc = (await get("/status")).json()
                return doc["streams"][0]["groups"][0]["endpoints"][1]["backlog_seconds"] >= 2

            await wait_for(backlog_grows, 10, "region-b's backlog to grow")
            proxy.heal()

            async def region_b_back() -> bool:
                doc = (await get("/status")).json()
                b = doc["streams"][0]["groups"][0]["endpoints"][1]
                return b["state"] == "streaming" and b["reconnects"] >= 1 and b["resent"] >= 1

            await wait_for(region_b_back, 15, "region-b streaming again, with a resend")

            # The primary's encoder in a crash loop: /readyz says so.
            broken.set()

            async def encoder_down() -> bool:
                response = await get("/readyz")
                return response.status_code == 503 and "group primary: encoder down" in response.text

            await wait_for(encoder_down, 10, "/readyz 503 naming the primary's encoder")
            doc = (await get("/status")).json()
            assert doc["groups"]["primary"]["restarts"] >= 1
            assert "test: encoder broken" in doc["groups"]["primary"]["last_error"]
            assert doc["groups"]["backup"]["encoder_up"] is True
            healed.set()
            await wait_for(ready, 20, "/readyz 200 after the encoder recovered")
            assert (await get("/healthz")).status_code == 200
        running.stop.set()
        with trio.fail_after(15):
            while any(p.connected for p in running.publishers):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
