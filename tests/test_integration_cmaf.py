"""End to end with CMAF endpoints: `orchestrator up` (synthetic encoder, primary and backup
groups) pushing CMAF ingest (template paths) to two `orchestrator ingest` servers on loopback.

Shows: both groups send every segment of every track to the same path (stream, track, index)
with identical timing; each segment is archived once (the other group's copy is a duplicate);
no conflict, rejection or gap; each archive is a CMAF track file ffprobe decodes, continuous
and starting at a time counted from 1970; SIGTERM ends cleanly. Each server is reached through a
tap (tests/parsekit.py) that records the requests as it received them: every CMAF header and
segment of both groups is then read by mp4box.js, a parser we did not write, and must say what
the ingest point logged."""

from __future__ import annotations

import itertools
import re
import shutil
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from parsekit import Request, Tap, mp4box, needs_mp4box, pymp4_boxes, pymp4_find
from prometheus_client.parser import text_string_to_metric_families
from rig import DEMO, ffprobe_packets, free_port, get_status, wait_until

from orchestrator.wire import cmaf

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


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe: apt-get install ffmpeg (see README)")
@needs_mp4box
def test_both_groups_push_cmaf_segments_with_identical_paths_and_timing(tmp_path, ingest_server, up_process):
    servers = [ingest_server("region-a"), ingest_server("region-b")]
    ports = [server.port for server in servers]
    taps = [Tap(("127.0.0.1", port)) for port in ports]
    metrics_port = free_port()
    up = up_process(cmaf_profile(tmp_path, [tap.port for tap in taps], metrics_port), ready=None)
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
        for tap in taps:
            tap.close()
    assert code == 0, up.text()[-3000:]
    # Keep-alive: each publisher (group, track, endpoint) carried its header and every segment so
    # far over one connection (the ingest server keeps them 75 s; segments come every 2 s).
    assert len(counted) == 8, counted  # 2 groups x 2 tracks x 2 endpoints
    for labels, (requests, connections) in counted.items():
        assert requests >= MIN_FRAGMENTS, (labels, requests)
        assert connections == 1, (labels, requests, connections)

    for server, tap in zip(servers, taps, strict=True):
        archive = server.archive
        status = server.status(posts=True)
        assert status is not None
        assert status["cmaf"]["counts"].get("malformed", 0) == 0, status["cmaf"]["counts"]
        assert status["cmaf"]["counts"]["headers"] >= 4  # each group's header of each track
        assert status["cmaf"]["counts"]["last_segments"] == 4  # SIGTERM: each group ended each track with lmsg
        assert status["publishing_points"] == {}  # nothing went the Smooth way
        # Fixed segment duration: no segment off its track's by more than a frame (the audio's 93 or 94 frames are not).
        assert status["cmaf"]["tolerated"].get("segment_duration", 0) == 0, status["cmaf"]["segment_durations"]
        durations = status["cmaf"]["segment_durations"]
        assert durations["live/demo/video/video_360p"] == {"1": {"duration": 180_180, "off_duration": 0}}
        assert durations["live/demo/audio/audio_eng"]["2"]["duration"] in (93 * 1024, 94 * 1024)  # 2 s of 48 kHz
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
        check_every_request_with_mp4box(tap.requests(), status, archive)


def check_every_request_with_mp4box(requests: list[Request], status: dict, archive: Path) -> None:
    """Every CMAF header and segment the server received, read by mp4box.js: a header is ftyp
    (CMAF brands) + moov with one trak whose sample entry ends with btrt; a segment is styp, prft,
    moof (mfhd = the path's index; traf: tfhd, tfdt, trun of whole frames) and mdat, and says
    what the ingest point logged for it (time, duration). Then each group's track file (header +
    its segments in index order) is one continuous run of samples to mp4box.js (pymp4 reads each
    segment's mfhd, tfdt and trun alike), and the point's
    archive of each track holds, to mp4box.js, exactly the samples both groups sent: the same
    bytes at the same decode times, none missing, none twice."""
    logged: dict[tuple[str, str, int], tuple[int, int]] = {}
    for post in status["cmaf"]["post_log"]:
        stream = post["publishing_point"].rsplit("/", 1)[1]
        for f in post["fragments"]:
            logged[(post["encoder_group"], f"{stream}/{post['stream']}", f["index"])] = (f["time"], f["duration"])
    headers: dict[tuple[str, str], bytes] = {}
    segments: dict[tuple[str, str], dict[int, bytes]] = defaultdict(dict)
    segment_bytes: list[tuple[tuple[str, str], int, bytes]] = []  # every segment request, resends included
    for request in requests:
        assert request.method in ("POST", "PUT"), request.method
        match = re.fullmatch(r"/live/demo/(\w+)/(\w+)/(init|\d+)\.m4s", request.target)
        assert match, request.target
        key = (request.headers["x-encoder-group"], f"{match[1]}/{match[2]}")
        if match[3] == "init":
            assert headers.setdefault(key, request.body) == request.body, f"{key}: the header changed"
            continue
        index = int(match[3])
        segment_bytes.append((key, index, request.body))
        first = segments[key].setdefault(index, request.body)
        # Sent again only as the track's last segment (up stopped after sending it): the same bytes, lmsg added.
        assert request.body in (first, cmaf.mark_last(first)), f"{key} segment {index} sent again, changed"
    assert set(headers) == set(segments) == {(g, t) for g in ("primary", "backup") for t in TRACKS}
    assert len(segment_bytes) == status["cmaf"]["counts"]["segments"]  # every segment request the point took

    keys = sorted(segments)
    header_bytes = [headers[key] for key in keys]
    track_files = [headers[key] + b"".join(body for _, body in sorted(segments[key].items())) for key in keys]
    archived = {name: archive / track["file"] for name, track in cmaf_tracks(status).items()}
    names = sorted(archived)
    parsed = mp4box(*header_bytes, *(body for _, _, body in segment_bytes), *track_files,
                    *(archived[name].read_bytes() for name in names))  # fmt: skip
    read_headers = parsed[: len(keys)]
    read_segments = parsed[len(keys) : len(keys) + len(segment_bytes)]
    read_files = parsed[len(keys) + len(segment_bytes) : len(keys) + len(segment_bytes) + len(keys)]
    read_archives = parsed[len(keys) + len(segment_bytes) + len(keys) :]

    for key, header in zip(keys, read_headers, strict=True):
        timescale, _ = TRACKS[key[1]]
        assert header.types == ["ftyp", "moov"], key
        ftyp, moov = header.boxes
        assert (ftyp["major_brand"], ftyp["compatible_brands"]) == ("cmfc", ["iso6", "cmfc", "cmf2"]), key
        assert moov.types.count("trak") == 1, key
        assert moov.one("mdhd")["timescale"] == timescale, key
        [entry] = moov.one("stsd").boxes
        assert entry.types[-1] == "btrt", key

    last_segments = 0
    for (key, index, body), segment in zip(segment_bytes, read_segments, strict=True):
        timescale, frame = TRACKS[key[1]]
        assert segment.types == ["styp", "prft", "moof", "mdat"], (key, index)
        styp, prft, moof, _ = segment.boxes
        assert styp["major_brand"] == "cmfs"
        last_segments += "lmsg" in styp["compatible_brands"]
        assert moof.one("mfhd")["sequence_number"] == index
        traf = moof.one("traf")
        assert traf.types == ["tfhd", "tfdt", "trun"]
        tfdt = traf.one("tfdt")["baseMediaDecodeTime"]
        durations = traf.one("trun")["sample_duration"]
        assert set(durations) == {frame}, (key, index, sorted(set(durations)))
        assert prft["media_time"] == tfdt
        assert (tfdt, sum(durations)) == logged[(*key, index)], (key, index)
        # pymp4, a second parser we did not write, reads the same boxes and numbers.
        by_pymp4 = pymp4_boxes(body)
        assert [b.type.decode() for b in by_pymp4] == segment.types
        assert pymp4_find(by_pymp4[2], b"mfhd").sequence_number == index
        assert pymp4_find(by_pymp4[2], b"tfdt").baseMediaDecodeTime == tfdt
        assert [s.sample_duration for s in pymp4_find(by_pymp4[2], b"trun").sample_info] == durations
        assert tfdt // timescale >= EPOCH_S
    assert last_segments == status["cmaf"]["counts"]["last_segments"] == 4

    sent: dict[str, dict[int, str]] = defaultdict(dict)  # track -> decode time -> sample SHA-256, both groups
    for key, track_file in zip(keys, read_files, strict=True):
        [samples] = track_file.samples.values()
        steps = {b["dts"] - a["dts"] for a, b in itertools.pairwise(samples)}
        assert steps == {TRACKS[key[1]][1]}, f"{key}: mp4box.js reads a gap or overlap: steps {sorted(steps)}"
        for sample in samples:
            assert sent[key[1]].setdefault(sample["dts"], sample["sha256"]) == sample["sha256"], (key, sample)
    for name, archived_file in zip(names, read_archives, strict=True):
        assert archived_file.types[:2] == ["ftyp", "moov"]
        [samples] = archived_file.samples.values()
        assert {sample["dts"]: sample["sha256"] for sample in samples} == sent[name], name
        assert len(samples) == len(sent[name])  # none twice
