"""The metrics listener's routes on loopback, against a real ``up`` (synthetic encoder, real
ingest server, real sockets): /metrics, /healthz, /readyz (including unready while a group's
encoder is down), /status, 404 and 405."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from opsrig import ops_up
from rig import wait_for

from orchestrator import supervisor
from orchestrator.testing.faultproxy import Fault


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
    async with ops_up(tmp_path) as (_, proxy, base_url), httpx.AsyncClient(base_url=base_url, timeout=5) as client:

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
        assert "http://" not in response.text  # endpoints by name and region, never a URL
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
