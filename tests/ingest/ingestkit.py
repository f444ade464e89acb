"""The ingest tests' kit: a one-track stream of the packaged clip (``Media``; the ``media`` and
``server`` fixtures are in ``conftest.py``), chunked bodies, and ``/status`` reads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from rig import wait_for

from orchestrator.fmp4 import boxes
from orchestrator.ingest.server import IngestApp
from orchestrator.wire import smooth

INGEST = "/live/demo.isml/Streams(video)"
FRAMES_PER_FRAGMENT = 5
FRAME = 3000  # ticks at 90 kHz: 30 fps
FRAGMENTS = 10  # 50 frames: the whole clip
A_STOPS = 6  # group A sends fragments 0..5 only


@dataclass(frozen=True)
class Media:
    """A one-track stream of the packaged H.264 clip (50 intra frames), re-stamped at 90 kHz."""

    track: boxes.TrackHeader
    header: bytes
    fragments: tuple[bytes, ...]

    @property
    def init(self) -> bytes:
        return smooth.write_ftyp() + boxes.write_moov([self.track])


@dataclass
class Server:
    app: IngestApp
    url: str
    archive: Path


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    """A chunked request body, yielding to other tasks between chunks."""
    for part in parts:
        yield part
        await trio.sleep(0)


def halves(data: bytes) -> tuple[bytes, bytes]:
    return data[: len(data) // 2], data[len(data) // 2 :]


async def status_of(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await client.get(f"{url}/status?posts=1")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    return response.json()  # type: ignore[no-any-return]


async def wait_for_status(url: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
                          ) -> dict[str, Any]:  # fmt: skip
    """Poll /status (10 ms apart) until ``predicate`` holds; the status that matched."""
    seen: list[dict[str, Any]] = []
    async with httpx.AsyncClient() as client:

        async def matches() -> bool:
            seen.append(await status_of(client, url))
            return predicate(seen[-1])

        try:
            await wait_for(matches, timeout, "a /status that matches", interval=0.01)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last one: {json.dumps(seen[-1:], indent=2)}") from None
    return seen[-1]


def video_track(status: dict[str, Any]) -> dict[str, Any]:
    return status["publishing_points"]["live/demo"]["streams"]["video"]["tracks"]["1"]  # type: ignore[no-any-return]
