"""Headless Chromium for the monitor pages' tests: the DOM after the page's script ran, a
screenshot, the tiles read back from the DOM, and the clips the groups encode.

Chromium runs as a subprocess (``--dump-dom`` / ``--screenshot`` with a virtual-time budget,
during which the page fetches ``/monitor.json`` and draws). Both helpers are async
(``trio.run_process``), so an ``up`` running in the test's own trio run keeps running meanwhile.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import trio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--mute-audio"]  # fmt: skip


async def chromium(url: str, *extra: str, budget_ms: int = 4000, timeout: float = 90) -> str:
    assert CHROMIUM is not None
    with trio.fail_after(timeout):
        result = await trio.run_process([CHROMIUM, *FLAGS, f"--virtual-time-budget={budget_ms}", *extra, url],
                                        capture_stdout=True, capture_stderr=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode()


async def dump_dom(url: str) -> str:
    return await chromium(url, "--dump-dom")


async def screenshot(url: str, path: Path, size: str = "1100,900") -> Path:
    await chromium(url, f"--screenshot={path}", f"--window-size={size}")
    assert path.read_bytes().startswith(b"\x89PNG"), f"{path} is not a PNG"
    return path


@dataclass
class Tile:
    stream: str
    track: str
    group: str
    where: str
    marks: list[str]
    index: str
    text: str = ""
    img: str | None = None


@dataclass
class Page:
    rows: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (stream, track) -> data-*
    tiles: list[Tile] = field(default_factory=list)
    peers: dict[str, str] = field(default_factory=dict)  # name -> data-ok
    summary: str = ""
    updated: str | None = None

    def tile(self, stream: str, group: str, track: str = "") -> Tile:
        found = [t for t in self.tiles if (t.stream, t.track, t.group) == (stream, track, group)]
        assert len(found) == 1, f"one tile for {stream}/{track}/{group}, found {len(found)}: {self.tiles}"
        return found[0]


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._row: dict[str, str] | None = None
        self._tile: Tile | None = None
        self._depth = 0  # element depth inside the current tile
        self._summary = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "body":
            self.page.updated = a.get("data-updated")
        if tag == "section" and "row" in classes:
            self._row = {k[5:]: v for k, v in a.items() if k.startswith("data-")}
            self.page.rows[(a["data-stream"], a.get("data-track", ""))] = self._row
        elif tag == "div" and "tile" in classes and self._row is not None:
            self._tile = Tile(self._row["stream"], self._row.get("track", ""), a["data-group"], a["data-where"],
                              a["data-marks"].split(), a["data-index"])  # fmt: skip
            self.page.tiles.append(self._tile)
            self._depth = 0
        elif self._tile is not None:
            if tag == "img":
                self._tile.img = a.get("src")
            if tag != "img":  # the one void element in a tile
                self._depth += 1
        elif tag == "span" and "peer" in classes:
            self.page.peers[a["data-peer"]] = a["data-ok"]
        if a.get("id") == "summary":
            self._summary = True

    def handle_endtag(self, tag: str) -> None:
        if self._tile is not None:
            if self._depth == 0 and tag == "div":
                self._tile.text = " ".join(self._tile.text.split())
                self._tile = None
            else:
                self._depth -= 1
        if tag == "div":
            self._summary = False

    def handle_data(self, data: str) -> None:
        if self._tile is not None:
            self._tile.text += data
        if self._summary:
            self.page.summary += data


def read_page(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    assert reader.page.updated, "the page's script drew nothing (no data-updated on body):\n" + html[-3000:]
    return reader.page


async def monitor_json(base: str) -> dict[str, Any]:
    """One poll of the page's document (it renews the viewer lease, as the page does)."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{base}/monitor.json")
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


def tiles_of(document: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(stream, track, group@where) -> tile, for either kind of document."""
    out = {}
    for row in document.get("rows") or document.get("streams") or []:
        for tile in row["tiles"]:
            where = tile.get("where", "here")
            name = tile["group"] if where == "here" else f"{tile['group']}@{where}"
            out[(row["stream"], row.get("track", ""), name)] = tile
    return out


def make_clip(path: Path, *, still_from: float | None, seconds: int = 16, tone: bool = True) -> Path:
    """A clip for a file source: testsrc2 (moving), turning into a still picture (SMPTE bars)
    at ``still_from`` seconds if given; a 440 Hz tone, or digital silence."""
    rate, size = "25", "320x180"
    if still_from is None:
        video = f"testsrc2=size={size}:rate={rate}:duration={seconds}"
    else:
        video = (
            f"testsrc2=size={size}:rate={rate}:duration={still_from}[a];"
            f"smptebars=size={size}:rate={rate}:duration={seconds - still_from}[b];[a][b]concat=n=2:v=1:a=0"
        )
    audio = "sine=frequency=440:sample_rate=48000" if tone else "anullsrc=r=48000:cl=stereo"
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", audio,
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", "-y", str(path)], check=True)  # fmt: skip
    return path
