"""Live content lock, proved on the pictures and the sound: one MPEG-TS/UDP sender, both groups
reading it, the backup's host clock 0.2 s ahead (libfaketime, realtime clock only) and its copy
of the stream 0.15 s late (a UDP delay relay in this test). Each group is an ``orchestrator up``
process pushing to its own local publishing point; the backup starts after the primary and
adopts the primary's mapping through its metrics endpoint (``source.peers``).

Locked by arrival time (the code before the live lock), the two groups would be
0.2 + 0.15 s = 10 to 11 frames apart; locked to the source's timestamps they carry the same
picture and sound under the same index.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import BinaryIO

import pytest
import trio
from rig import free_port
from test_content_lock import assert_same_content, lock_profile, make_clip

from orchestrator.ingest.server import IngestApp, serve_app

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                       reason="needs ffmpeg and ffprobe: apt-get install ffmpeg (see README)"),
    pytest.mark.skipif(shutil.which("faketime") is None,
                       reason="needs libfaketime: apt-get install faketime (see README)"),
]  # fmt: skip

SKEW = "+0.2"  # the backup host's wall clock, seconds ahead
DELAY = 0.15  # the backup's path from the contribution feed, seconds longer


async def relay(listen: trio.socket.SocketType, primary: int, backup: int) -> None:
    """Forward every datagram to the primary at once and to the backup DELAY later, in order.
    Cancellation: stops forwarding, closes both sockets; datagrams in flight are dropped."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](100_000)
    out = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def late() -> None:
        async for due, data in receive:
            await trio.sleep_until(due)
            await out.sendto(data, ("127.0.0.1", backup))

    with out, listen:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late)
            while True:
                data = await listen.recv(65536)
                await out.sendto(data, ("127.0.0.1", primary))
                send.send_nowait((trio.current_time() + DELAY, data))


def fragments(app: IngestApp) -> int:
    points = app.point.status()["publishing_points"]
    tracks = points.get("live/lock", {}).get("streams", {}).get("av", {}).get("tracks", {})
    return min((t["fragments_archived"] for t in tracks.values()), default=0) if len(tracks) == 2 else 0


async def test_a_live_source_shows_the_same_pictures_and_sound_despite_clock_skew_and_path_delay(tmp_path):
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    relay_port, ports = free_port(socket.SOCK_DGRAM), [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    metrics = [free_port(), free_port()]
    sender = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-nostdin", "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy",
         "-f", "mpegts", f"udp://127.0.0.1:{relay_port}?pkt_size=1316"])  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []
    try:
        async with trio.open_nursery() as nursery:
            listen = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await listen.bind(("127.0.0.1", relay_port))
            nursery.start_soon(relay, listen, ports[0], ports[1])
            apps = [IngestApp(tmp_path / name) for name in ("primary", "backup")]
            ingest = [(await nursery.start(serve_app, app, "127.0.0.1", 0))[1] for app in apps]
            sources = [f'{{ kind = "live", url = "udp://127.0.0.1:{ports[i]}?overrun_nonfatal=1", '
                       f'peers = ["http://127.0.0.1:{metrics[1 - i]}/metrics"] }}' for i in range(2)]  # fmt: skip
            for i, group in enumerate(("primary", "backup")):  # one host each: its own metrics port
                text = lock_profile(sources[0], sources[1], ingest[0], ingest[1], {"listen": f"127.0.0.1:{metrics[i]}"})
                (tmp_path / f"{group}.toml").write_text(text)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            skewed = {**env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
            up = [sys.executable, "-m", "orchestrator", "up", "--status", "off"]
            logs.append((tmp_path / "primary.log").open("wb"))
            processes.append(subprocess.Popen([*up, "--group", "primary", str(tmp_path / "primary.toml")], env=env,
                                              stderr=logs[0]))  # fmt: skip
            with trio.fail_after(40):
                while fragments(apps[0]) < 1:
                    await trio.sleep(0.1)
            logs.append((tmp_path / "backup.log").open("wb"))
            backup = ["faketime", "-f", SKEW, *up, "--group", "backup", str(tmp_path / "backup.toml")]
            # faketime forks and waits for the command: a signal to it would not reach `up` (which
            # lived on after the test). Its own session, signalled as a group, stops both.
            processes.append(subprocess.Popen(backup, env=skewed, stderr=logs[1], start_new_session=True))
            with trio.fail_after(40):
                while fragments(apps[1]) < 5:
                    await trio.sleep(0.1)
            for process in processes:
                signal_all(process, signal.SIGTERM)
            with trio.fail_after(20):
                while any(p.poll() is None for p in processes):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        for process in [*processes, sender]:
            signal_all(process, signal.SIGKILL)  # whatever is left of the session too
            process.wait(10)
        for file in logs:
            file.close()
    backup_log = (tmp_path / "backup.log").read_text()
    assert "encoder.live.lock group=backup origin=peer" in backup_log, backup_log[-3000:]
    assert_same_content(apps[0], apps[1])


def signal_all(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """``signum`` to the process, and to its whole session when it leads one (the faketime wrapper)."""
    try:
        if os.getsid(process.pid) == process.pid:
            os.killpg(process.pid, signum)
        elif process.poll() is None:
            process.send_signal(signum)
    except ProcessLookupError:
        pass


def test_faketime_skews_the_realtime_clock_only():
    """The skew the test relies on is really there (libfaketime works on this machine)."""
    real = float(subprocess.run(["date", "+%s.%N"], capture_output=True, text=True, check=True).stdout)
    env = {**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    fake = float(subprocess.run(["faketime", "-f", SKEW, "date", "+%s.%N"], capture_output=True, text=True,
                                check=True, env=env).stdout)  # fmt: skip
    assert 0.15 < fake - real < 0.5
