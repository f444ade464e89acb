"""Real ffmpeg encoders on the shared clock, into a real local publishing point on loopback.

A two-rendition, one-audio presentation in three streams (the 360p video alone; the 180p video
with the audio bundled; the same audio alone again, spec section 11) is encoded by one ffmpeg
per group, primary and backup, for about 15 fragments. In the middle, the primary's ffmpeg is
killed with SIGKILL; later the backup's is frozen with SIGSTOP (it stops producing). Then:

* primary and backup fragments have identical indices, timestamps and durations, all on the
  shared clock; the merged timeline has no gap, no conflict, no header mismatch;
* the killed instance was restarted, counted as ``killed`` with its exit code, and its next
  fragment continues the index (higher than any before the kill, on the clock);
* the frozen one was noticed by the stall watchdog, ignored SIGTERM, was SIGKILLed, counted as
  ``stalled`` and restarted;
* ffprobe decodes every archived track: a keyframe on every fragment boundary and nowhere
  else, no timestamp gap, and the expected duration.

A second run checks the file and live (UDP) sources against each other.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import rig
import trio
from prometheus_client import CollectorRegistry

from orchestrator.encode.ffmpeg_command import AAC_PRIMING_FRAMES, plan_encodes, priming_frames
from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.profile import parse_profile
from orchestrator.push.handoff import EndpointOutbox
from orchestrator.supervisor import UpOptions, run_up
from orchestrator.testing import profiles
from orchestrator.testing.profiles import ladder, profile_text

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                       reason="needs ffmpeg and ffprobe: apt-get install ffmpeg (see README)"),
]  # fmt: skip

# (stream, track ID, frame ticks). Track IDs are presentation-wide: the audio is track 3 in both
# streams that carry it.
TRACKS = [("hi", 1, 3003), ("lo", 2, 3003), ("lo", 3, 1024), ("audio", 3, 1024)]


def test_aac_priming_is_what_the_recutter_drops():
    """Ask the installed ffmpeg: its AAC encoder's first packet starts one frame early."""
    out = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
         "sine=frequency=1000:sample_rate=48000", "-t", "0.2", "-c:a", "aac", "-f", "framecrc", "-"],
        check=True, capture_output=True, text=True)  # fmt: skip
    first = next(line for line in out.stdout.splitlines() if not line.startswith("#"))
    assert int(first.split(",")[1]) == -1024 * AAC_PRIMING_FRAMES
    # ... and that is what the recutter of each encode is told to drop: the audio's priming
    # frame, nothing of the video (kept, every group's sound would be 21 ms late on its picture).
    streams = {"av": [profiles.video("video"), profiles.audio("audio")]}
    groups = {name: profiles.group(profiles.endpoint(port)) for name, port in (("primary", 1), ("backup", 2))}
    profile = parse_profile(profiles.profile_text(streams=streams, groups=groups), "priming.toml")
    dropped = {e.track.name: priming_frames(e) * 1024 for e in plan_encodes(profile)}
    assert dropped == {"video": 0, "audio": -int(first.split(",")[1])}


def ffprobe_packets(path: Path) -> list[tuple[int, bool]]:
    """(pts, keyframe) of every packet, in the track's timescale, after decoding every frame."""
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "null", "-"], check=True)
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "0", "-show_entries", "packet=pts,flags",
         "-of", "json", str(path)],
        check=True, capture_output=True, text=True)  # fmt: skip
    return [(int(p["pts"]), "K" in p["flags"]) for p in json.loads(out.stdout)["packets"]]


def fragments_from(app: IngestApp, group: str) -> dict[tuple[str, int], dict[int, tuple[int, int]]]:
    """(stream, track) -> {index: (time, duration)} of what the receiver got from ``group``."""
    out: dict[tuple[str, int], dict[int, tuple[int, int]]] = defaultdict(dict)
    for post in app.point.status(posts=True)["post_log"]:
        if post["encoder_group"] == group:
            for f in post["fragments"]:
                out[(post["stream"], f["track"])][f["index"]] = (f["time"], f["duration"])
    return out


async def wait_for_fragments(app: IngestApp, group: str, count: int, timeout: float) -> None:
    await rig.wait_for(lambda: all(len(fragments_from(app, group).get((s, t), ())) >= count for s, t, _ in TRACKS),
                   timeout, f"{count} fragments per track from {group}")  # fmt: skip


def assert_merged_timeline_whole(app: IngestApp) -> None:
    status = app.point.status()
    for stream_id, stream in status["publishing_points"]["live/ladder"]["streams"].items():
        assert stream["header_mismatches"] == 0, stream_id  # the groups' ffmpeg headers are identical
        for track_id, track in stream["tracks"].items():
            assert (track["gaps"], track["conflicts"], track["rejected"]) == (0, 0, 0), (stream_id, track_id, track)


def restarts(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """(group, reason) -> restarts counted, for every reason that was counted at all."""
    return {
        (sample.labels["group"], sample.labels["reason"]): sample.value
        for family in registry.collect() if family.name == "orchestrator_encoder_restarts"
        for sample in family.samples if sample.name.endswith("_total") and sample.value
    }  # fmt: skip


AUDIO_ENTRY = re.compile(rb"<audio .*?</audio>", re.DOTALL)


async def test_ladder_on_real_ffmpeg_survives_a_killed_encoder(tmp_path, monkeypatch):
    registry = CollectorRegistry()
    pushed: dict[int, dict[tuple[int, int], bytes]] = defaultdict(dict)  # outbox -> (track, index) -> bytes
    real_push = EndpointOutbox.push

    def recording_push(self, fragment):
        pushed[id(self)][(fragment.track_id, fragment.index)] = fragment.data
        return real_push(self, fragment)

    monkeypatch.setattr(EndpointOutbox, "push", recording_push)
    async with trio.open_nursery() as servers:
        app = IngestApp(tmp_path / "archive")
        _, port = await servers.start(serve_app, app, "127.0.0.1", 0)
        profile = parse_profile(profile_text(**ladder(port)), "ladder.toml")
        options = UpOptions(status="off", handle_signals=False, shutdown_grace=8.0)
        async with trio.open_nursery() as up:  # ends when run_up returns after its graceful stop
            running = await up.start(lambda task_status: run_up(profile, options, registry=registry,
                                                                task_status=task_status))  # fmt: skip

            def seen(group: str) -> dict[tuple[str, int], dict[int, tuple[int, int]]]:
                return fragments_from(app, group)

            async def wait_for(group: str, count: int, timeout: float) -> None:
                await wait_for_fragments(app, group, count, timeout)

            await wait_for("primary", 4, 40)
            await wait_for("backup", 4, 10)

            async def signal_instance(group: str, signum: int, timeout: float, then: int) -> None:
                """Send ``signum`` to the group's ffmpeg, wait for the restarted instance, check the
                exit code it left, then wait for ``then`` more fragments on every track."""
                encoder = next(g for g in running.group_encoders if g.group == group)
                pid = encoder.instance_pid
                assert pid is not None
                os.kill(pid, signum)
                with trio.fail_after(timeout):
                    while encoder.instance_pid in (None, pid):
                        await trio.sleep(0.05)
                assert registry.get_sample_value("orchestrator_encoder_last_exit_code", {"group": group}) == -9
                after = {key: len(v) for key, v in seen(group).items()}
                with trio.fail_after(30):
                    while not all(len(seen(group).get(key, ())) >= n + then for key, n in after.items()):
                        await trio.sleep(0.1)

            before_kill = max(max(seen("primary")[(s, t)]) for s, t, _ in TRACKS)
            await signal_instance("primary", signal.SIGKILL, 10, then=4)
            # Frozen: the stall window (4 s) passes, SIGTERM is ignored, SIGKILL follows 2 s later.
            await signal_instance("backup", signal.SIGSTOP, 20, then=2)
            running.stop.set()
        servers.cancel_scope.cancel()

    # The kill and the freeze were noticed and counted as such, and nothing else restarted.
    assert restarts(registry) == {("primary", "killed"): 1, ("backup", "stalled"): 1}

    assert_merged_timeline_whole(app)
    status = app.point.status()

    primary_seen, backup_seen = seen("primary"), seen("backup")
    for stream_id, track_id, _ in TRACKS:
        clock = profile.track_clock(profile.track(stream_id, track_id))
        p, b = primary_seen[(stream_id, track_id)], backup_seen[(stream_id, track_id)]
        for k, (time, duration) in itertools.chain(p.items(), b.items()):
            assert (time, duration) == (clock.start(k), clock.duration(k)), f"{stream_id}/{track_id} #{k} off clock"
        common = set(p) & set(b)
        assert len(common) >= 6
        assert all(p[k] == b[k] for k in common)
        # After the kill the primary continued the index: higher than before, never reused.
        resumed = sorted(k for k in p if k > before_kill)
        assert resumed, f"{stream_id}/{track_id}: nothing after the kill"
        assert resumed == list(range(resumed[0], resumed[-1] + 1))
        assert resumed[0] - before_kill <= 3, "the restart skipped more than the fragments in flight"

    # Redundant audio (spec 11): in each group, the two streams that carry the audio got the same
    # fragment bytes for every index, and their headers the same manifest entry for it.
    for encoder in running.group_encoders:
        lo, alone = (pushed[id(encoder.outputs[s][0].outbox)] for s in ("lo", "audio"))
        common = {k for (track, k) in lo if track == 3} & {k for (_, k) in alone}
        assert len(common) >= 6
        assert all(lo[(3, k)] == alone[(3, k)] for k in common)
        entries = [AUDIO_ENTRY.search(encoder.headers[s].header.data) for s in ("lo", "audio")]  # type: ignore[union-attr]
        assert entries[0] is not None
        assert entries[1] is not None
        assert entries[0].group() == entries[1].group()

    # The archive (both groups merged) of every track decodes; keyframes exactly on the
    # fragment boundaries; timestamps continuous; duration as the clock says.
    archive = tmp_path / "archive"
    for stream_id, track_id, frame in TRACKS:
        track = status["publishing_points"]["live/ladder"]["streams"][stream_id]["tracks"][str(track_id)]
        packets = ffprobe_packets(archive / track["file"])
        clock = profile.track_clock(profile.track(stream_id, track_id))
        steps = {b[0] - a[0] for a, b in itertools.pairwise(packets)}
        assert steps == {frame}, f"{stream_id}/{track_id}: timestamp steps {sorted(steps)}"
        first_k = clock.index_of_tick(packets[0][0])
        assert packets[0][0] == clock.start(first_k)
        end = packets[-1][0] + frame
        last_k = clock.index_of_tick(end - 1)
        assert end == clock.start(last_k + 1), "the archive ends on a fragment boundary"
        assert last_k - first_k + 1 >= 9
        if frame == 3003:  # video: a keyframe on every fragment boundary and nowhere else
            boundaries = {clock.start(k) for k in range(first_k, last_k + 1)}
            keyframes = {pts for pts, key in packets if key}
            assert keyframes == boundaries


async def test_a_looped_file_and_a_live_udp_input_land_on_the_same_clock(tmp_path):
    """Primary reads a file in a loop; backup reads the same clip as live MPEG-TS over UDP from
    a sender ffmpeg. Different sources, different frame rate (25 fps in, 29.97 out) and sample
    rate (44.1 kHz in, 48 kHz out): the fragments still agree exactly."""
    clip = tmp_path / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25", "-f", "lavfi",
         "-i", "sine=frequency=440:sample_rate=44100", "-t", "3", "-c:v", "libx264", "-preset", "ultrafast",
         "-g", "25", "-c:a", "aac", "-shortest", str(clip)],
        check=True)  # fmt: skip
    udp_port = rig.free_port(socket.SOCK_DGRAM)
    sender = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-nostdin", "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy",
         "-f", "mpegts", f"udp://127.0.0.1:{udp_port}?pkt_size=1316"])  # fmt: skip
    try:
        registry = CollectorRegistry()
        async with trio.open_nursery() as servers:
            app = IngestApp(tmp_path / "archive")
            _, port = await servers.start(serve_app, app, "127.0.0.1", 0)
            file_source = f'source = {{ kind = "file", path = "{clip}" }}'
            live_source = f'source = {{ kind = "live", url = "udp://127.0.0.1:{udp_port}?overrun_nonfatal=1" }}'
            # The production stall window (3 fragments): the short one the kill test uses for
            # speed is shorter than a live input's start (ffmpeg probes the MPEG-TS first).
            text = profile_text(**ladder(port)).replace("stall_fragments = 2\n", "")
            text = text.replace('preset = "ultrafast" }', f'preset = "ultrafast", {file_source} }}', 1)  # primary
            text = text.replace('preset = "ultrafast" }', f'preset = "ultrafast", {live_source} }}', 1)  # backup
            profile = parse_profile(text, "sources.toml")
            options = UpOptions(status="off", handle_signals=False, shutdown_grace=8.0)
            async with trio.open_nursery() as up:
                running = await up.start(lambda task_status: run_up(profile, options, registry=registry,
                                                                    task_status=task_status))  # fmt: skip
                await wait_for_fragments(app, "primary", 4, 40)
                await wait_for_fragments(app, "backup", 4, 20)
                running.stop.set()
            servers.cancel_scope.cancel()
    finally:
        sender.terminate()
        sender.wait(10)

    assert restarts(registry) == {}, "no instance of either group restarted, for any reason"
    assert_merged_timeline_whole(app)
    primary_seen, backup_seen = fragments_from(app, "primary"), fragments_from(app, "backup")
    for stream_id, track_id, _ in TRACKS:
        p, b = primary_seen[(stream_id, track_id)], backup_seen[(stream_id, track_id)]
        common = set(p) & set(b)
        assert len(common) >= 3
        assert all(p[k] == b[k] for k in common)
        clock = profile.track_clock(profile.track(stream_id, track_id))
        assert all(p[k] == (clock.start(k), clock.duration(k)) for k in p)
