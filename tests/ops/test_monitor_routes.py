"""The monitor's routes over real sockets: on ``up``'s ops listener (in-process ``up``, synthetic
encoder) and on the ingest server: content types, the Content-Security-Policy and the other
security headers, no external asset and no inline script, read-only (405), HEAD, a disabled
monitor, and the viewer lease taken only by ``/monitor.json``."""

from __future__ import annotations

import re

import httpx
import pytest
from rig import build_profile, free_port, loopback_ingest, two_groups, up_in_process, wait_for

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.monitorweb import CSP

pytestmark = pytest.mark.integration

EXPECTED_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip


def assert_secure(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == EXPECTED_CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


async def check_static(client: httpx.AsyncClient, base: str) -> None:
    page = await client.get(f"{base}/monitor")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert_secure(page)
    html = page.text
    assert '<script src="/monitor.js" defer></script>' in html
    assert "<script>" not in html, "no inline script: the policy would block it anyway"
    assert not re.search(r"<[^>]*\son\w+\s*=", html), "no inline event handler"
    assert "style=" not in html
    for path, kind in (("/monitor.js", "text/javascript"), ("/monitor.css", "text/css")):
        asset = await client.get(f"{base}{path}")
        assert asset.status_code == 200
        assert asset.headers["content-type"] == f"{kind}; charset=utf-8"
        assert_secure(asset)
    for path in ("/monitor", "/monitor.js", "/monitor.css"):
        body = (await client.get(f"{base}{path}")).text
        assert not re.search(r"(https?:)?//[a-z0-9]", body, flags=re.IGNORECASE), f"{path} loads nothing from elsewhere"
    script = (await client.get(f"{base}/monitor.js")).text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, f"names reach the page as text only ({sink})"


async def test_up_serves_the_monitor_read_only_with_a_strict_policy(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with loopback_ingest(tmp_path / "archive") as ingest:
        profile = build_profile(groups=two_groups(ingest.port), metrics={"listen": f"127.0.0.1:{port}"})
        async with up_in_process(profile) as running, httpx.AsyncClient(timeout=10) as client:
            assert running.monitor is not None
            await check_static(client, base)
            assert not running.monitor.thumbnailer.watching, "the page, its script and style take no lease"
            document = await client.get(f"{base}/monitor.json")
            assert document.status_code == 200
            assert document.headers["content-type"] == "application/json; charset=utf-8"
            assert_secure(document)
            assert running.monitor.thumbnailer.watching, "a poll of the document takes the lease"
            data = document.json()
            assert data["kind"] == "up"
            assert [s["stream"] for s in data["streams"]] == ["video", "audio"]
            assert [t["group"] for t in data["streams"][0]["tiles"]] == ["primary", "backup"]
            assert data["peers"] == []
            assert (await client.post(f"{base}/monitor.json")).status_code == 405
            assert (await client.delete(f"{base}/monitor")).status_code == 405
            head = await client.head(f"{base}/monitor")
            assert head.status_code == 200
            assert head.content == b""
            missing = await client.get(f"{base}/monitor/thumb", params={"s": "video", "g": "nobody"})
            assert missing.status_code == 404
            assert (await client.get(f"{base}/monitor/peer/0/thumb")).status_code == 404
            assert (await client.get(f"{base}/status")).json()["presentation"] == "rig", "/status as before"

            async def thumbnail() -> bool:
                tiles = (await client.get(f"{base}/monitor.json")).json()["streams"][0]["tiles"]
                return all(t["picture"] and t["picture"]["url"] for t in tiles)

            await wait_for(thumbnail, 30, "thumbnails of the synthetic video")
            tile = (await client.get(f"{base}/monitor.json")).json()["streams"][0]["tiles"][0]
            png = await client.get(f"{base}{tile['picture']['url']}")
            assert png.status_code == 200
            assert png.headers["content-type"] == "image/png"
            assert png.content.startswith(b"\x89PNG")
            metrics = (await client.get(f"{base}/metrics")).text
            series = r'^orchestrator_monitor_decodes_total\{outcome="decoded"\} (\S+)$'
            decoded = re.search(series, metrics, re.MULTILINE)
            assert decoded is not None
            assert float(decoded.group(1)) >= 2, "the decodes are counted in the metrics"


async def test_a_disabled_monitor_is_not_served(tmp_path):
    port = free_port()
    async with loopback_ingest(tmp_path / "archive") as ingest:
        profile = build_profile(groups=two_groups(ingest.port), metrics={"listen": f"127.0.0.1:{port}"},
                                extra="[monitor]\nenabled = false")  # fmt: skip
        async with up_in_process(profile) as running, httpx.AsyncClient(timeout=10) as client:
            assert running.monitor is None
            assert (await client.get(f"http://127.0.0.1:{port}/monitor")).status_code == 404
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200


async def test_the_ingest_server_serves_its_monitor_with_the_same_policy(tmp_path):
    async with loopback_ingest(tmp_path / "archive") as ingest, httpx.AsyncClient(timeout=10) as client:
        base = f"http://127.0.0.1:{ingest.port}"
        await check_static(client, base)
        document = await client.get(f"{base}/monitor.json")
        assert_secure(document)
        assert document.json()["kind"] == "ingest"
        assert document.json()["rows"] == []
        assert (await client.post(f"{base}/monitor.json")).status_code == 405
        assert (await client.get(f"{base}/status")).status_code == 200, "/status as before"
        # What arrives is counted per group, the header's group name as the client sent it.
        profile = build_profile(groups=two_groups(ingest.port))
        source = SyntheticStream(profile, profile.streams[0])
        body = source.header.data + b"".join(f.data for k in range(5000, 5003) for f in source.fragment(k))
        for group in ("primary", "backup"):
            answer = await client.post(f"{base}/live/rig.isml/Streams(video)", content=body,
                                       headers={"X-Encoder-Group": group})  # fmt: skip
            assert answer.status_code == 200
        [row] = (await client.get(f"{base}/monitor.json")).json()["rows"]
        assert (row["stream"], row["track"], row["kind"]) == ("live/rig/video", "video_360p", "video")
        outcomes = {t["group"]: t["outcomes"] for t in row["tiles"]}
        assert outcomes == {"primary": {"archived": 3}, "backup": {"duplicate": 3}}
        assert {t["group"]: t["last_index"] for t in row["tiles"]} == {"primary": 5002, "backup": 5002}
    assert CSP == EXPECTED_CSP
