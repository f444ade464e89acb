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

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
from array import array
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
import trio
from lockkit import assert_same_content, lock_profile, make_clip
from prometheus_client.parser import text_string_to_metric_families
from rig import free_port

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


@pytest.mark.parametrize("kill_primary", [False, True], ids=["apart", "apart_then_primary_ffmpeg_killed"])
async def test_a_live_source_shows_the_same_pictures_and_sound_despite_clock_skew_and_path_delay(
    tmp_path, kill_primary
):
    """``kill_primary``: once the backup has adopted, the primary's ffmpeg is SIGKILLed; its
    restart must take the same mapping again (saved or from the peer: never a new one), so the
    pictures and sound stay the same under the same timestamp after the restart too."""
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
            if kill_primary:
                os.kill(ffmpeg_child(processes[0].pid), signal.SIGKILL)
                before = fragments(apps[0])
                with trio.fail_after(40):
                    while fragments(apps[0]) < before + 5:
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
    if kill_primary:  # restarted on the mapping it had: one offset in every lock line of the primary
        primary_log = (tmp_path / "primary.log").read_text()
        locks = [line for line in primary_log.splitlines() if "encoder.live.lock group=primary" in line]
        assert len(locks) >= 2, primary_log[-3000:]
        assert len({line.split(" offset=")[1].split()[0] for line in locks}) == 1, locks
        assert "origin=established" not in locks[-1], locks
    assert_same_content(apps[0], apps[1])


def ffmpeg_child(pid: int) -> int:
    """The ffmpeg process among ``pid``'s children (the encoder instance of a one-group ``up``)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].endswith(b"ffmpeg"):
                return int(child)
    raise AssertionError(f"no ffmpeg child of {pid}")


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


@pytest.mark.parametrize("sender_restarts", [False, True], ids=["together", "then_the_sender_restarts"])
async def test_live_groups_started_together_converge_on_one_mapping_without_a_restart_by_hand(
    tmp_path, sender_restarts
):
    """Issue 18: both ``up`` started at the same moment with empty state (the backup's clock 0.2 s
    ahead, its feed 0.15 s late), each group's peer unreachable at first (a forwarder that opens
    only once both have locked: otherwise the one that probes later may simply adopt), so each
    establishes its own mapping, ~0.4 s apart. When the peers answer, within a peer check one
    moves to the agreed one at a fragment boundary, and from then on every picture and the sound
    are the same under the same timestamp. (Before the rule, both kept their own for good.)

    ``sender_restarts``: then the sender restarts (its timestamps jump back by ~25 s): each group
    sees the jump at once (not after the stall watchdog), re-locks, and they converge again."""
    from lockkit import (
        AAC_FRAME,
        assert_same_pictures,
        audio_lag,
        make_marked_clip,
        marks,
        packet_times,
        pictures,
        pip_onsets,
        track_files,
    )

    clip = tmp_path / "clip.mp4"
    make_marked_clip(clip, rate="30000/1001", seconds=90.09)  # longer than the run: never looped
    relay_port, ports = free_port(socket.SOCK_DGRAM), [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    metrics, forwarded = [free_port(), free_port()], [free_port(), free_port()]

    def send(capture: Path) -> list[str]:
        """The sender, also writing what it sends to ``capture`` (where its timestamps start)."""
        return ["ffmpeg", "-v", "error", "-nostdin", "-re", "-i", str(clip), "-map", "0", "-c", "copy", "-f", "tee",
                f"[f=mpegts]udp://127.0.0.1:{relay_port}?pkt_size=1316|[f=mpegts]{capture}"]  # fmt: skip

    captures = [tmp_path / "sent0.ts"]
    senders = [subprocess.Popen(send(captures[0]))]
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []
    try:
        async with trio.open_nursery() as nursery:
            listen = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await listen.bind(("127.0.0.1", relay_port))
            nursery.start_soon(relay, listen, ports[0], ports[1])
            apps = [IngestApp(tmp_path / name) for name in ("primary", "backup")]
            ingest = [(await nursery.start(serve_app, app, "127.0.0.1", 0))[1] for app in apps]
            # Each group reads its peer through a forwarder that is not listening yet.
            sources = [f'{{ kind = "live", url = "udp://127.0.0.1:{ports[i]}?overrun_nonfatal=1", '
                       f'peers = ["http://127.0.0.1:{forwarded[1 - i]}/metrics"] }}' for i in range(2)]  # fmt: skip
            for i, group in enumerate(("primary", "backup")):
                text = lock_profile(sources[0], sources[1], ingest[0], ingest[1], {"listen": f"127.0.0.1:{metrics[i]}"})
                (tmp_path / f"{group}.toml").write_text(text)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            skewed = {**env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
            up = [sys.executable, "-m", "orchestrator", "up", "--status", "off"]
            logs += [(tmp_path / "primary.log").open("wb"), (tmp_path / "backup.log").open("wb")]
            processes.append(subprocess.Popen([*up, "--group", "primary", str(tmp_path / "primary.toml")], env=env,
                                              stderr=logs[0]))  # fmt: skip
            backup = ["faketime", "-f", SKEW, *up, "--group", "backup", str(tmp_path / "backup.toml")]
            processes.append(subprocess.Popen(backup, env=skewed, stderr=logs[1], start_new_session=True))
            with trio.fail_after(40):
                while not all(f"encoder.live.lock group={g}" in (tmp_path / f"{g}.log").read_text()
                              for g in ("primary", "backup")):  # fmt: skip
                    await trio.sleep(0.1)
            for port, target in zip(forwarded, metrics, strict=True):  # the peers come back
                nursery.start_soon(functools.partial(trio.serve_tcp, functools.partial(forward, target), port,
                                                     host="127.0.0.1"))  # fmt: skip
            with trio.fail_after(90):
                while min(fragments(app) for app in apps) < 14:
                    await trio.sleep(0.2)
            if sender_restarts:
                senders[0].kill()
                senders[0].wait(10)
                captures.append(tmp_path / "sent1.ts")
                senders.append(subprocess.Popen(send(captures[1])))  # its timestamps start again at 1.4 s
                before = min(fragments(app) for app in apps)
                with trio.fail_after(90):
                    while min(fragments(app) for app in apps) < before + 10:
                        await trio.sleep(0.2)
            async with httpx.AsyncClient() as client:
                pages = [(await client.get(f"http://127.0.0.1:{port}/metrics")).text for port in metrics]
            for process in processes:
                signal_all(process, signal.SIGTERM)
            with trio.fail_after(20):
                while any(p.poll() is None for p in processes):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        for process in [*processes, *senders]:
            signal_all(process, signal.SIGKILL)
            process.wait(10)
        for file in logs:
            file.close()
    texts = {g: (tmp_path / f"{g}.log").read_text() for g in ("primary", "backup")}
    first = {g: next(line for line in text.splitlines() if "encoder.live.lock " in line) for g, text in texts.items()}
    assert all("origin=established" in line for line in first.values()), first
    # Converged: the last instance of each group runs the same mapping (the log line of its lock).
    final = {g: [line for line in text.splitlines() if "encoder.live.lock " in line][-1] for g, text in texts.items()}
    offsets = {g: line.split(" offset=")[1].split()[0] for g, line in final.items()}
    assert offsets["primary"] == offsets["backup"], [line for t in texts.values() for line in t.splitlines()
                                                     if "encoder.live." in line]  # fmt: skip
    assert any("encoder.live.peer_unreachable" in text for text in texts.values())
    # What each group exports as its content offset is the source time of the agreed mapping.
    for group, page in zip(("primary", "backup"), pages, strict=True):
        exported = {s.labels["track"]: s.value for f in text_string_to_metric_families(page)
                    for s in f.samples if f.name == "orchestrator_content_offset_seconds"}  # fmt: skip
        expected = ((-int(offsets[group])) % 2**33) / 90000
        assert exported == {"video": expected, "audio": expected}, (group, exported, expected)
    if sender_restarts:  # seen at once by ffmpeg in both groups, not after the stall watchdog
        assert all("timestamps jumped" in text for text in texts.values())
        assert not any("reason=stalled" in text for text in texts.values())
    # From the first fragment of each group's last instance (after the last move or re-lock) every
    # common picture is the same and the sound is in step.
    started = [int(line.split("first_index=")[1].split()[0]) for t in texts.values()
               for line in [x for x in t.splitlines() if "encoder.started " in x][-1:]]  # fmt: skip
    p, b = track_files(apps[0]), track_files(apps[1])
    since = max(started) * 2 * 90000  # fragment start in video ticks (2 s, 90 kHz)
    # Compared with each other from the fragment after (a just-started x264 codes its first
    # pictures coarser than a running one: seen 8-11 gray levels apart on 3 frames); the marks
    # below check every picture from ``since`` exactly.
    settled = since + 2 * 90000
    primary_pictures = {t: v for t, v in pictures(p["video"]).items() if t >= settled}
    backup_pictures = {t: v for t, v in pictures(b["video"]).items() if t >= settled}
    assert_same_pictures(primary_pictures, backup_pictures, step=3003)
    # Absolute: the picture at shared tick T is the source frame whose timestamp the lock maps to T:
    # source pts = T - offset (mod 2^33), source frame = (pts - the sender's first pts) / 3003, nearest.
    first_pts = packet_times(captures[-1])[0]
    for group, archive in (("primary", p), ("backup", b)):
        wrong = {}
        shown = {t: m for t, m in marks(archive["video"]).items() if t >= since}
        for t, m in shown.items():
            expected = (((t - int(offsets[group])) % 2**33 - first_pts) + 1501) // 3003
            if m != expected:
                wrong[t // 3003] = (m, expected)
        assert not wrong, f"{group}: {len(wrong)} of {len(shown)} pictures are not the source frame the lock " \
                          f"maps there (shared frame: shown, expected): {sorted(wrong.items())[:6]}"  # fmt: skip
        # ... and the sound is in sync with the source: each pip starts on a clip second (the clip's
        # second s is at the sender's first video timestamp + s x 90,000), within half an AAC frame.
        onsets = [n for n in pip_onsets(archive["audio"]) if n * 90000 >= since * 48000]
        assert len(onsets) >= 3, f"{group}: only {len(onsets)} pips heard"
        errors = []
        for n in onsets:
            source = ((n * 90000 // 48000) - int(offsets[group])) % 2**33 - first_pts  # ticks after clip frame 0
            errors.append(((source + 45000) % 90000 - 45000) * 48000 // 90000)  # samples off the nearest second
        assert all(abs(e) < AAC_FRAME // 2 for e in errors), f"{group}: pips off the clip's seconds by {errors}"
    since_samples = since * 48000 // 90000
    lag = audio_lag(steady_sound(p["audio"], since_samples), steady_sound(b["audio"], since_samples))
    assert abs(lag) < AAC_FRAME, f"the backup's sound is {lag} samples off the primary's"


async def forward(port: int, client: trio.SocketStream) -> None:
    """Pipe one TCP connection to 127.0.0.1:``port`` and back (a target that refuses, e.g. an ``up``
    shutting down, just closes the client). Cancellation: both are closed."""
    try:
        server = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        await client.aclose()
        return
    async with client, server:

        async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await sink.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, server)
            nursery.start_soon(pipe, server, client)


def steady_sound(path: Path, since: int) -> tuple[int, array]:
    """(first sample, mono PCM at 3 kHz) of the longest gap-free run of the archived audio that
    starts at or after shared sample ``since``; each AAC packet decodes to 1024 samples at its
    own timestamp (a restart leaves a gap that a plain decode would close up)."""
    from lockkit import DECIMATED_RATE, packet_times

    times = packet_times(path)
    raw = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-ac", "1", "-f", "s16le", "-"],
                         check=True, capture_output=True).stdout  # fmt: skip
    pcm = array("h", raw)
    assert len(pcm) == 1024 * len(times)
    runs, first = [], 0
    for i in range(1, len(times) + 1):
        if i == len(times) or times[i] != times[i - 1] + 1024:
            runs.append((first, i))
            first = i
    trimmed = [(next(i for i in range(a, z) if times[i] >= since), z) for a, z in runs if times[z - 1] >= since]
    first, end = max(trimmed, key=lambda r: r[1] - r[0])
    step = 48000 // DECIMATED_RATE
    return times[first], pcm[first * 1024 : end * 1024 : step]
