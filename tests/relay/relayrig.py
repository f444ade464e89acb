"""The relay tests' processes: a relay profile (the primary group a relay, its endpoints given by
port, a synthetic backup that never runs), ffmpeg's ismv push as the encoder (run in the test's
trio run), and the ingest archives read back with ffprobe."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from orchestrator.testing.ismvpush import ismv_push_argv
from orchestrator.testing.profiles import endpoint, group, write_profile

STREAM = "video"
TRACKS = {1: "video", 2: "audio"}  # what ffmpeg's ismv muxer calls its tracks (the archive's file names)


def need_ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if found is None or shutil.which("ffprobe") is None:
        pytest.skip("ffmpeg and ffprobe are needed: sudo apt-get install -y ffmpeg")
    return found


def relay_profile(path: Path, *, listen: int, ports: list[int], metrics: int, spool: Path | None = None,
                  **relay: Any) -> Path:  # fmt: skip
    encoder: dict[str, Any] = {"backend": "relay", "listen": f"127.0.0.1:{listen}", **relay}
    if spool is not None:
        encoder["spool"] = str(spool)
    endpoints = [endpoint(port, name=f"ingest-{chr(97 + i)}", region=f"region-{chr(97 + i)}")
                 for i, port in enumerate(ports)]  # fmt: skip
    return write_profile(
        path, name="relay", streams={STREAM: [{"kind": "video", "name": "video", "bitrate": 300_000,
                                               "width": 320, "height": 180, "frame_rate": 25}]},
        groups={"primary": group(*endpoints, encoder=encoder), "backup": group(endpoint(ports[0]))},
        metrics={"enabled": True, "listen": f"127.0.0.1:{metrics}"})  # fmt: skip


@dataclass
class Push:
    """ffmpeg pushing to the relay: ``done`` is set when it exits, ``code`` its exit status."""

    argv: list[str]
    done: trio.Event = field(default_factory=trio.Event)
    code: int | None = None
    stderr: bytes = b""

    async def run(self) -> None:
        result = await trio.run_process(self.argv, capture_stdout=True, capture_stderr=True, check=False)
        self.code, self.stderr = result.returncode, result.stderr
        self.done.set()


def push(relay_port: int, seconds: int) -> Push:
    return Push(ismv_push_argv(f"http://127.0.0.1:{relay_port}/live/relay.isml/Streams({STREAM})", seconds,
                               ffmpeg=need_ffmpeg()))  # fmt: skip


def packets(path: Path) -> list[int]:
    """The pts of every packet of the file's one track, sorted, read by ffprobe (which must read
    the file through: a non-zero exit fails)."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=pts", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return sorted(int(p["pts"]) for p in json.loads(out.stdout)["packets"])


def track_files(archive: Path) -> dict[str, Path]:
    return {name: archive / "live" / "relay" / STREAM / f"{name}.mp4" for name in TRACKS.values()}


def ingest_tracks(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The ingest server's per-track counters of the relayed stream, by track name."""
    if status is None:
        return {}
    stream = status["publishing_points"].get("live/relay", {}).get("streams", {}).get(STREAM, {})
    return {track["name"]: track for track in stream.get("tracks", {}).values()}
