"""End to end with CMAF endpoints: `orchestrator up` (synthetic encoder, primary and backup
groups) pushing CMAF ingest (template paths) to two `orchestrator ingest` servers on loopback.

Shows: both groups send every segment of every track to the same path (stream, track, index)
with identical timing; each segment is archived once (the other group's copy is a duplicate);
no conflict, rejection or gap; each archive is a CMAF track file ffprobe decodes, continuous
and starting at a time counted from 1970; SIGTERM ends cleanly."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rig import DEMO, ffprobe_packets, free_port, get_status, wait_until

pytestmark = pytest.mark.integration

MIN_FRAGMENTS = 5
EPOCH_S = 1_767_225_600  # the demo's epoch, 2026-01-01T00:00:00Z
TRACKS = {"video/video_360p": (90_000, 3003), "audio/audio_eng": (48_000, 1024)}  # timescale, frame duration


def cmaf_profile(tmp_path: Path, ports: list[int], metrics_port: int) -> Path:
    text = DEMO.read_text()
    for old, port in (("127.0.0.1:18081", ports[0]), ("127.0.0.1:18082", ports[1])):
        cmaf = f'url = "http://127.0.0.1:{port}/live/demo"\n  format = "cmaf"\n  cmaf_paths = "template"'
        text = text.replace(f'url = "http://{old}/live/demo.isml"', cmaf)
    assert text.count('format = "cmaf"') == 4
    text = text.replace('listen = "127.0.0.1:9464"', f'listen = "127.0.0.1:{metrics_port}"')
    text, swapped = re.subn(r"^encoder = .*$", 'encoder = { backend = "synthetic" }', text, flags=re.MULTILINE)
    assert swapped == 2
    path = tmp_path / "cmaf.toml"
    path.write_text(text)
    return path


def cmaf_tracks(status: dict) -> dict[str, dict]:
    """'<stream>/<track>' -> that CMAF track's counters at the publishing point live/demo."""
    points = status["cmaf"]["publishing_points"]
    out = {}
    for stream in ("video", "audio"):
        for name, entry in points.get(f"live/demo/{stream}", {"streams": {}})["streams"].items():
            (track,) = entry["tracks"].values()
            out[f"{stream}/{name}"] = track
    return out


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe: apt-get install ffmpeg (see README)")
def push_counters(port: int) -> dict[tuple[str, ...], tuple[float, float]]:
    """``up``'s requests and connections opened, per (stream, group, endpoint), from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    values: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("orchestrator_posts_opened_total", "orchestrator_connections_opened_total"):
                key = tuple(sample.labels[k] for k in ("stream", "group", "endpoint"))
                values.setdefault(sample.name, {})[key] = sample.value
    requests, connections = values["orchestrator_posts_opened_total"], values["orchestrator_connections_opened_total"]
    return {key: (requests[key], connections[key]) for key in requests}


def test_both_groups_push_cmaf_segments_with_identical_paths_and_timing(tmp_path, ingest_server, up_process):
    servers = [ingest_server("region-a"), ingest_server("region-b")]
    ports = [server.port for server in servers]
    metrics_port = free_port()
    up = up_process(cmaf_profile(tmp_path, ports, metrics_port), ready=None)
    logs = [up.log] + [server.log for server in servers]
    try:

        def enough() -> bool:
            for port in ports:
                status = get_status(port)
                tracks = cmaf_tracks(status) if status else {}
                if set(tracks) != set(TRACKS) or min(t["fragments_archived"] for t in tracks.values()) < MIN_FRAGMENTS:
                    return False
            return True

        wait_until(enough, 60, f"{MIN_FRAGMENTS} CMAF segments archived per track in both regions", logs)
        counted = push_counters(metrics_port)
    finally:
        code = up.stop()
    assert code == 0, up.text()[-3000:]
    # Keep-alive: each publisher (group, track, endpoint) carried its header and every segment so
    # far over one connection (the ingest server keeps them 75 s; segments come every 2 s).
    assert len(counted) == 8, counted  # 2 groups x 2 tracks x 2 endpoints
    for labels, (requests, connections) in counted.items():
        assert requests >= MIN_FRAGMENTS, (labels, requests)
        assert connections == 1, (labels, requests, connections)

    for server in servers:
        archive = server.archive
        status = server.status(posts=True)
        assert status is not None
        assert status["cmaf"]["counts"].get("malformed", 0) == 0, status["cmaf"]["counts"]
        assert status["cmaf"]["counts"]["headers"] >= 4  # each group's header of each track
        assert status["cmaf"]["counts"]["last_segments"] == 4  # SIGTERM: each group ended each track with lmsg
        assert status["publishing_points"] == {}  # nothing went the Smooth way
        for name, track in cmaf_tracks(status).items():
            timescale, frame = TRACKS[name]
            assert (track["conflicts"], track["rejected"], track["gaps"]) == (0, 0, 0), track
            assert track["duplicates_dropped"] >= MIN_FRAGMENTS - 1, track  # the other group's copies
            stream, track_name = name.split("/")
            by_group: dict[str, dict[int, tuple[int, int]]] = {}
            for post in status["cmaf"]["post_log"]:
                if (post["publishing_point"], post["stream"]) == (f"live/demo/{stream}", track_name):
                    assert post["status"] == "ok", post
                    by_group.setdefault(post["encoder_group"], {}).update(
                        {f["index"]: (f["time"], f["duration"]) for f in post["fragments"]})  # fmt: skip
            assert set(by_group) == {"primary", "backup"}
            common = set(by_group["primary"]) & set(by_group["backup"])
            assert len(common) >= MIN_FRAGMENTS - 1
            for k in common:  # same path (stream, track, index) from both groups, same timing
                assert by_group["primary"][k] == by_group["backup"][k], f"{name} segment {k} differs between groups"
                time, _ = by_group["primary"][k]
                assert time // timescale >= EPOCH_S  # counted from 1970, not from the profile's epoch
            packets = ffprobe_packets(archive / track["file"])
            steps = {b[0] - a[0] for a, b in itertools.pairwise(packets)}
            assert steps == {frame}, f"{name}: timestamp steps {sorted(steps)}: a gap or overlap in the archive"
            assert packets[0][0] == min(t for times in by_group.values() for t, _ in times.values())
