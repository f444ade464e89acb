"""The relay run in this process for the relay's tests: a one-stream relay profile (its primary
group takes the encoder's push and forwards it to one endpoint), ``relay_in_process`` around
``run_relay``, the encoder's chunked POST, and the URL it posts to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from prometheus_client import CollectorRegistry
from rig import TEST_SETTINGS, build_profile, endpoint, group

from orchestrator.profile import Profile
from orchestrator.relay.server import RelayOptions, RelayRunning, run_relay

STREAMS = {"video": [{"kind": "video", "name": "video", "bitrate": 300_000, "width": 320, "height": 180,
                      "frame_rate": 25}]}  # fmt: skip


def relay_profile(port: int, metrics: bool = False, **relay: Any) -> Profile:
    encoder = {"backend": "relay", "listen": "127.0.0.1:0", "silent_fragments": 1, **relay}
    return build_profile(name="relay", streams=STREAMS, groups={
        "primary": group(endpoint(port, name="ingest-a", region="region-a"), encoder=encoder),
        "backup": group(endpoint(port))}, metrics={"enabled": metrics, "listen": "127.0.0.1:0"})  # fmt: skip


@asynccontextmanager
async def relay_in_process(profile: Profile, registry: CollectorRegistry,
                           **options: Any) -> AsyncIterator[RelayRunning]:  # fmt: skip
    options = {"status": "off", "handle_signals": False, "publisher_settings": TEST_SETTINGS, "shutdown_grace": 5,
               **options}  # fmt: skip
    async with trio.open_nursery() as nursery:
        running: RelayRunning = await nursery.start(
            lambda task_status: run_relay(profile, RelayOptions(**options), registry=registry,
                                          task_status=task_status))  # fmt: skip
        try:
            yield running
        finally:
            running.stop.set()


async def post(url: str, *parts: bytes, client: httpx.AsyncClient | None = None, **headers: str) -> httpx.Response:
    """One encoder POST, chunked, a part per chunk (as an encoder writes them)."""

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with httpx.AsyncClient(timeout=10) if client is None else client as http:
        return await http.post(url, content=body(), headers=headers)


def relay_url(running: RelayRunning, scheme: str = "http") -> str:
    assert running.listen_address is not None
    return f"{scheme}://127.0.0.1:{running.listen_address[1]}/live/pp.isml/Streams(video)"
