"""The relay's confidence monitor in-process (orchestrator/relay/monitor.py): ``/monitor`` and its
document on the relay's metrics listener, with one endpoint up (a real ingest server on
loopback) and one unreachable; the same security headers and read-only rights as ``/status``; the
encoder's duplicates counted on their tile; ``[monitor] enabled = false`` turns it off. The page
in a real browser: tests/ops/test_monitor_relay_browser.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from relaykit import ffmpeg_body, header
from relayserverkit import STREAMS, post, relay_in_process, relay_url
from rig import build_profile, endpoint, free_port, group, loopback_ingest, wait_for

from orchestrator.ops.monitorweb import CSP
from orchestrator.profile import Profile


def two_endpoint_profile(up_port: int, down_port: int, **extra: Any) -> Profile:
    encoder = {"backend": "relay", "listen": "127.0.0.1:0"}
    return build_profile(name="relay", streams=STREAMS, groups={
        "primary": group(endpoint(up_port, name="ingest-a", region="region-a"),
                         endpoint(down_port, name="ingest-b", region="region-b"), encoder=encoder),
        "backup": group(endpoint(up_port))}, metrics={"enabled": True, "listen": "127.0.0.1:0"}, **extra)  # fmt: skip


def tiles(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["stream"], row["track"]): tile for row in document["rows"] for tile in row["tiles"]}


async def test_the_relay_monitor_shows_each_track_and_each_endpoints_state(tmp_path: Path) -> None:
    unreachable = free_port()  # nothing listens there
    async with loopback_ingest(tmp_path / "archive") as ingest, \
            relay_in_process(two_endpoint_profile(ingest.port, unreachable), CollectorRegistry()) as running, \
            httpx.AsyncClient(timeout=10) as client:  # fmt: skip
        assert running.metrics_address is not None
        base = f"http://127.0.0.1:{running.metrics_address[1]}"

        before = (await client.get(f"{base}/monitor.json")).json()
        assert before["kind"] == "relay"
        assert before["presentation"] == "relay"
        [row] = before["rows"]  # nothing from the encoder yet: the stream's row, with its endpoints
        assert (row["stream"], row["track"]) == ("video", "")
        assert [e["endpoint"] for e in row["tiles"][0]["endpoints"]] == ["ingest-a", "ingest-b"]
        assert row["tiles"][0]["marks"][0] == "stale"

        assert (await post(relay_url(running), header(), *ffmpeg_body(3))).status_code == 200
        assert (await post(relay_url(running), header(), *ffmpeg_body(2, first=1))).status_code == 200  # resent

        def states(document: dict[str, Any]) -> dict[str, str]:
            return {e["endpoint"]: e["state"] for e in tiles(document)[("video", "video")]["endpoints"]}

        async def both_known() -> bool:
            document = (await client.get(f"{base}/monitor.json")).json()
            return ("video", "video") in tiles(document) and states(document) == {
                "ingest-a": "streaming", "ingest-b": "reconnecting"}  # fmt: skip

        await wait_for(both_known, 15, "ingest-a streaming and ingest-b reconnecting on the monitor")
        document = (await client.get(f"{base}/monitor.json")).json()
        found = tiles(document)
        assert set(found) == {("video", "video"), ("video", "audio")}, "the stream's row gave way to its tracks"
        video, audio = found[("video", "video")], found[("video", "audio")]
        assert video["group"] == audio["group"] == "primary"
        assert video["last_index"] == audio["last_index"] == 2
        assert video["media_ms"] == 4000
        assert audio["media_ms"] == 4000 - 22  # the AAC priming: -213,333 ticks of 10 MHz, in ms (rounded down)
        assert video["outcomes"] == {"duplicate": 2, "forwarded": 3}
        assert video["marks"] == audio["marks"] == ["endpoint down"]
        rows = {(r["stream"], r["track"]): r for r in document["rows"]}
        assert rows[("video", "video")]["kind"] == "video"
        assert rows[("video", "audio")]["kind"] == "audio"
        down = next(e for e in video["endpoints"] if e["endpoint"] == "ingest-b")
        assert down["region"] == "region-b"
        assert down["last_error"], "the unreachable endpoint's error is shown"
        assert down["backlog_fragments"] >= 1, "what it has not had waits in its backlog"
        assert not {"url", "credentials"} & set(down), "names and states only, as on /status"

        for path, kind in (("/monitor", "text/html"), ("/monitor.js", "text/javascript"),
                           ("/monitor.css", "text/css"), ("/monitor.json", "application/json")):  # fmt: skip
            answer = await client.get(f"{base}{path}")
            assert answer.status_code == 200, path
            assert answer.headers["content-type"].startswith(kind), path
            assert answer.headers["content-security-policy"] == CSP
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["cache-control"] == "no-store"
        assert (await client.head(f"{base}/monitor")).content == b""
        refused = await client.post(f"{base}/monitor.json", content=b"{}")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"
        assert (await client.get(f"{base}/monitor/thumb?s=video&t=nothing&g=primary&i=1")).status_code == 404
        assert (await client.get(f"{base}/monitor/peer/0/thumb?s=video&g=primary")).status_code == 404
        assert (await client.get(f"{base}/status")).status_code == 200, "/status as before"


async def test_the_relay_monitor_can_be_turned_off(tmp_path: Path) -> None:
    profile = two_endpoint_profile(free_port(), free_port(), extra="[monitor]\nenabled = false")
    async with relay_in_process(profile, CollectorRegistry()) as running, httpx.AsyncClient(timeout=10) as client:
        assert running.metrics_address is not None
        base = f"http://127.0.0.1:{running.metrics_address[1]}"
        assert (await client.get(f"{base}/monitor")).status_code == 404
        assert (await client.get(f"{base}/status")).status_code == 200


async def test_nothing_is_kept_for_pictures_while_nobody_watches(tmp_path: Path) -> None:
    """Without a page polling /monitor.json the relay counts what arrives (a few integers) and
    keeps no fragment for the decoder; the first poll starts the keeping."""
    profile = two_endpoint_profile(free_port(), free_port())
    async with relay_in_process(profile, CollectorRegistry()) as running:
        assert running.app is not None
        monitor = running.app.monitor
        assert monitor is not None
        assert (await post(relay_url(running), header(), *ffmpeg_body(3))).status_code == 200
        assert not monitor.thumbnailer.watching
        assert monitor.thumbnailer.shelf.size == 0
        assert monitor.thumbnailer.counts.decoded == 0
        assert {key[0]: a.last_index for key, a in monitor.tiles.arrivals.items()} == {
            ("video", "video"): 2, ("video", "audio"): 2}  # fmt: skip
        assert running.metrics_address is not None
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"http://127.0.0.1:{running.metrics_address[1]}/monitor.json")).status_code == 200
        assert monitor.thumbnailer.watching
        assert (await post(relay_url(running), header(), *ffmpeg_body(1, first=3))).status_code == 200

        def taken() -> bool:  # kept on the shelf, or already handed to ffmpeg (these test bytes do not decode)
            return monitor.thumbnailer.shelf.size > 0 or sum(monitor.thumbnailer.counts.as_json().values()) > 0

        await wait_for(taken, 20, "watched: the new fragments kept for decoding")
