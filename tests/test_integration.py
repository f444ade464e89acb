"""End to end, as an operator runs it: two `orchestrator ingest` servers (two regions), one
`orchestrator up` with a primary and a backup group pushing two streams to both, on loopback.

Shows, over at least six fragments: primary and backup fragments carry identical timestamps,
durations and indices; indices rise by exactly one; each archive is continuous and ffprobe reads
it with the expected duration; SIGTERM ends every POST cleanly and exits 0.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
from rig import demo_profile, ffprobe_packets, free_port, get_status, wait_until

pytestmark = pytest.mark.integration

MIN_FRAGMENTS = 6
needs_ffprobe = pytest.mark.skipif(
    shutil.which("ffprobe") is None, reason="needs ffprobe: apt-get install ffmpeg (see README)"
)


def track_status(status: dict, stream: str) -> dict:
    (track,) = status["publishing_points"]["live/demo"]["streams"][stream]["tracks"].values()  # one per stream
    return track


def profile_for(tmp_path: Path, ports: list[int], metrics_port: int) -> Path:
    # The skeleton's end-to-end path, on the synthetic encoder (tests/encode/test_ffmpeg.py runs ffmpeg).
    return demo_profile(tmp_path / "event.toml", (ports[0], ports[1]), metrics=f"127.0.0.1:{metrics_port}",
                        state_dir=tmp_path / "state")  # fmt: skip


@needs_ffprobe
def test_primary_and_backup_push_aligned_fragments_to_two_regions(tmp_path, ingest_server, up_process):
    servers = [ingest_server("region-a"), ingest_server("region-b")]
    ports = [server.port for server in servers]
    metrics_port = free_port()
    profile = profile_for(tmp_path, ports, metrics_port)
    up = up_process(profile, ready=None)
    logs = [up.log] + [server.log for server in servers]
    try:

        def enough() -> bool:
            for port in ports:
                status = get_status(port)
                if status is None or "live/demo" not in status["publishing_points"]:
                    return False
                streams = status["publishing_points"]["live/demo"]["streams"]
                for stream in ("video", "audio"):
                    if stream not in streams or track_status(status, stream)["fragments_archived"] < MIN_FRAGMENTS:
                        return False
            return True

        # Six 2-second fragments plus start-up; generous for a loaded 2-core CI machine.
        wait_until(enough, 60, f"{MIN_FRAGMENTS} fragments archived per track in both regions", logs)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    finally:
        code = up.stop()
    assert code == 0, up.text()[-3000:]

    # Metrics were live while running: every group pushed every stream to every endpoint.
    for group in ("primary", "backup"):
        for stream in ("video", "audio"):
            for endpoint in ("region-a", "region-b"):
                labels = (f'endpoint="{endpoint}"', f'group="{group}"', f'stream="{stream}"')
                pushed = [
                    line for line in metrics.splitlines() if line.startswith("orchestrator_fragments_pushed_total{")
                ]
                lines = [line for line in pushed if all(label in line for label in labels)]
                assert lines, f"no pushed-fragments metric for {group}/{stream}/{endpoint}"
                assert float(lines[0].rsplit(" ", 1)[1]) >= MIN_FRAGMENTS - 1

    up_text = up.text()
    assert "supervisor.stopped" in up_text
    assert "status stream=video index=" in up_text  # the plain per-stream status line (not a TTY)

    clock_durations = {"video": Fraction(2), "audio": Fraction(2)}
    for server in servers:
        status = server.status(posts=True)
        assert status is not None
        for stream in ("video", "audio"):
            track = track_status(status, stream)
            assert track["conflicts"] == 0, track
            assert track["rejected"] == 0, track
            assert track["gaps"] == 0, track
            assert track["duplicates_dropped"] >= MIN_FRAGMENTS - 1, track  # the other group's copies
            assert status["publishing_points"]["live/demo"]["streams"][stream]["header_mismatches"] == 0

            posts = [p for p in status["post_log"] if p["stream"] == stream]
            by_group: dict[str, dict[int, tuple[int, int]]] = {}
            for post in posts:
                # SIGTERM ended every POST cleanly: final chunk sent, 200 received.
                assert post["status"] == "ok", post
                fragments = post["fragments"]
                indices = [f["index"] for f in fragments]
                assert indices == list(range(indices[0], indices[0] + len(indices))), "indices rise by exactly 1"
                for a, b in itertools.pairwise(fragments):
                    assert a["time"] + a["duration"] == b["time"], "timestamps are continuous"
                by_group.setdefault(post["encoder_group"], {}).update(
                    {f["index"]: (f["time"], f["duration"]) for f in fragments}
                )
            assert set(by_group) == {"primary", "backup"}
            common = set(by_group["primary"]) & set(by_group["backup"])
            assert len(common) >= MIN_FRAGMENTS - 1
            for k in common:
                assert by_group["primary"][k] == by_group["backup"][k], f"fragment {k} differs between groups"

            # The archive is one playable, continuous fragmented MP4 per track.
            file = server.archive / track["file"]
            packets = ffprobe_packets(file)
            # ffprobe's packet "duration" for the synthetic H.264 comes from the clip's VUI (25 fps),
            # so continuity is judged on presentation timestamps: one frame apart, always.
            frame = 3003 if stream == "video" else 1024
            steps = {b[0] - a[0] for a, b in itertools.pairwise(packets)}
            assert steps == {frame}, f"timestamp steps {sorted(steps)}: a gap or overlap in the archive"
            assert all(key for _, key in packets), "every synthetic sample is a sync sample"
            span = packets[-1][0] + frame - packets[0][0]
            expected = clock_durations[stream] * track["fragments_archived"] * track["timescale"]
            # Each fragment holds whole frames, so it is within one frame of the nominal 2 s.
            assert abs(span - expected) <= frame * track["fragments_archived"], (span, expected)
            # The archive starts with the earliest fragment either group delivered.
            assert packets[0][0] == min(t for fragments in by_group.values() for t, _ in fragments.values())


@needs_ffprobe
def test_up_with_local_ingest_runs_the_demo_without_outside_servers(tmp_path, up_process):
    ports = [free_port(), free_port()]
    profile = profile_for(tmp_path, ports, free_port())
    archive = tmp_path / "archive"
    up = up_process(profile, "--local-ingest", str(archive), "--duration", "7", ready=None)
    try:
        code = up.process.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("up --duration 7 did not end by itself")
    assert code == 0, up.text()[-3000:]
    files = sorted(p.relative_to(archive) for p in archive.rglob("*.mp4"))
    assert [str(p) for p in files] == [
        f"127.0.0.1-{port}/live/demo/{stream}/{track}.mp4"
        for port in sorted(ports)
        for stream, track in (("audio", "audio_eng"), ("video", "video_360p"))
    ]
    for file in files:
        packets = ffprobe_packets(archive / file)
        assert len(packets) >= 59  # at least one whole 2 s fragment
