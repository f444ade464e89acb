"""The local publishing point's CMAF side: init before media, box order, de-duplication by
(track, tfdt) across groups, late segments counted, lmsg, and a playable archive per track."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.fmp4 import boxes
from orchestrator.ingest.cmafpoint import Answer, CmafPath, CmafPoint, parse_path
from orchestrator.ingest.receiver import Decision, StreamPath
from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.profile import load_profile
from orchestrator.wire import cmaf

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
NOW_NS = 1_800_000_000 * 10**9
K = 14_080_000
TRACK = StreamPath(("live", "demo", "video"), "video_360p")
HEADER = CmafPath(TRACK, None)


class Track:
    """The demo's video track as a CMAF sender writes it."""

    def __init__(self) -> None:
        profile = load_profile(DEMO, now_ns=NOW_NS)
        self.source = SyntheticStream(profile, profile.streams[0])
        self.segmenter = cmaf.Segmenter(profile.presentation.epoch_ns)
        [(_, header)] = self.segmenter.track_headers(self.source.header).values()
        self.header = header.data

    def segment(self, k: int, *, last: bool = False) -> bytes:
        return self.segmenter.segment(self.source.fragment(K + k)[0], last=last)


class Archive:
    def __init__(self) -> None:
        self.files: dict[tuple[str, ...], bytes] = {}
        self.decisions: list[Decision] = []

    def __call__(self, decision: Decision) -> None:
        self.decisions.append(decision)
        for write in decision.writes:
            self.files[write.path] = (b"" if write.new_file else self.files.get(write.path, b"")) + write.data


def send(point: CmafPoint, archive: Archive, index: int | None, body: bytes, group: str = "primary") -> Answer:
    return point.request(CmafPath(TRACK, index), body, group, 0.0, archive)


@pytest.fixture(scope="module")
def track() -> Track:
    return Track()


def test_paths_of_the_template_scheme() -> None:
    assert parse_path("/live/demo/video/video_360p/init.m4s") == CmafPath(TRACK, None)
    assert parse_path(f"/live/demo/video/video_360p/{K}.m4s") == CmafPath(TRACK, K)
    assert parse_path("/live/demo.isml/Streams(video)") is None  # Smooth's
    assert parse_path("/video/video_360p/init.m4s") is None  # no publishing point path
    with pytest.raises(ValueError, match=r"unsafe name '\.\.'"):
        parse_path("/live/../video/video_360p/init.m4s")


def test_header_then_segments_from_both_groups_archive_each_segment_once(track: Track, tmp_path: Path) -> None:
    point, archive = CmafPoint(), Archive()
    for group in ("primary", "backup"):
        assert send(point, archive, None, track.header, group) == Answer(200, "")
        for k in range(3):
            assert send(point, archive, K + k, track.segment(k, last=k == 2), group) == Answer(200, "")
    outcomes = [(d.outcome, d.fragment.index, d.fragment.time) for d in archive.decisions]
    epoch_ticks = cmaf.epoch_ticks(1_767_225_600 * 10**9, 90_000)
    starts = [f.start + epoch_ticks for k in range(3) for f in track.source.fragment(K + k)]
    assert outcomes == [("archived", K + k, starts[k]) for k in range(3)]  # the backup's copies: duplicates
    status = point.status()
    [stats] = status["publishing_points"]["live/demo/video"]["streams"]["video_360p"]["tracks"].values()
    assert (stats["fragments_archived"], stats["duplicates_dropped"], stats["conflicts"], stats["gaps"]) == (3, 3, 0, 0)
    assert status["counts"] == {"headers": 2, "last_segments": 2, "segments": 6}
    # The archive is the track's CMAF file: init segment, then each segment's moof + mdat as sent.
    [(path, data)] = archive.files.items()
    assert path == ("live", "demo", "video", "video_360p", "track1.mp4")
    [trak] = track.source.header.tracks[:1]
    moov_track = boxes.parse_moov(track.header[28 + 8 :])[0]
    assert data == cmaf.RECEIVER.init_segment(moov_track) + b"".join(
        cmaf.split_segment(track.segment(k)).fragment for k in range(3))  # fmt: skip
    assert trak.track_id == moov_track.track_id
    file = tmp_path / "track1.mp4"
    file.write_bytes(data)
    command = ["ffprobe", "-v", "error", "-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"]
    out = subprocess.run([*command, str(file)], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "180"  # 3 fragments of 2 s at 30000/1001


def test_a_segment_before_its_header_is_answered_412(track: Track) -> None:
    point, archive = CmafPoint(), Archive()
    answer = send(point, archive, K, track.segment(0))
    assert answer.status == 412
    assert "no CMAF header for live/demo/video/video_360p: send it first" in answer.text
    assert send(point, archive, None, track.header).status == 200
    assert send(point, archive, K, track.segment(0)).status == 200
    assert [d.outcome for d in archive.decisions] == ["archived"]
    assert point.counts["missing_init"] == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [(lambda t: t.header + t.header, "one ftyp and one moov describing one track"),
     (lambda t: t.header[:-10], "one ftyp and one moov describing one track"),
     (lambda t: t.source.header.data, "one ftyp and one moov describing one track")],  # a Smooth header
    ids=["two headers", "truncated", "smooth"],
)  # fmt: skip
def test_a_header_that_is_not_one_cmaf_track_is_refused(track: Track, body, reason: str) -> None:
    answer = send(CmafPoint(), Archive(), None, body(track))
    assert answer.status == 400
    assert reason in answer.text or "not a CMAF header" in answer.text


def test_segment_boxes_out_of_order_or_foreign_are_refused(track: Track) -> None:
    point, archive = CmafPoint(), Archive()
    send(point, archive, None, track.header)
    segment = cmaf.split_segment(track.segment(0))
    answer = send(point, archive, K, segment.fragment + cmaf.write_styp())
    assert (answer.status, answer.text) == (400, "a CMAF segment is [styp] [prft] moof mdat, not moof mdat styp\n")
    no_tfdt = boxes.write_movie_fragment(K, [boxes.TrackRun(1, 0, [boxes.Sample(b"x", 3003)], K)])
    no_tfdt = no_tfdt.replace(b"tfdt", b"free")  # the traf's tfdt made a free box: no time
    answer = send(point, archive, K, no_tfdt)
    assert answer.status == 400
    assert archive.decisions == []


def test_a_late_segment_is_archived_and_counted(track: Track) -> None:
    """A segment older than the track's newest (the other group filling a gap) is archived, not
    lost, and counted as late."""
    point, archive = CmafPoint(), Archive()
    send(point, archive, None, track.header)
    for k in (0, 2, 1):
        assert send(point, archive, K + k, track.segment(k)).status == 200
    assert [d.fragment.index - K for d in archive.decisions] == [0, 2, 1]
    assert point.counts["late"] == 1


# --- the server's CMAF route, over real HTTP on loopback ----------------------------------------


async def test_the_server_takes_put_and_post_answers_412_405_400_and_archives(nursery, tmp_path: Path,
                                                                              track: Track) -> None:  # fmt: skip
    app = IngestApp(tmp_path / "archive")
    host, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
    base = f"http://{host}:{port}/live/demo/video/video_360p"
    async with httpx.AsyncClient() as client:

        async def send_one(method: str, name: str, body: bytes) -> tuple[int, str]:
            response = await client.request(method, f"{base}/{name}", content=body,
                                            headers={"X-Encoder-Group": "primary"})  # fmt: skip
            return response.status_code, response.text

        assert (await send_one("PUT", f"{K}.m4s", track.segment(0)))[0] == 412
        assert await send_one("PUT", "init.m4s", track.header) == (200, "")
        assert await send_one("PUT", f"{K}.m4s", track.segment(0)) == (200, "")
        assert await send_one("POST", f"{K + 1}.m4s", track.segment(1)) == (200, "")
        assert (await send_one("POST", "init.m4s", track.source.header.data))[0] == 400  # a Smooth header
        response = await client.get(f"{base}/init.m4s")
        assert (response.status_code, response.headers["allow"]) == (405, "POST, PUT")
        status = (await client.get(f"http://{host}:{port}/status")).json()
    app.close()
    assert status["cmaf"]["counts"] == {"headers": 1, "malformed": 1, "missing_init": 1, "segments": 2}
    assert status["refusals"] == {"400": 1, "412": 1}
    file = tmp_path / "archive" / "live" / "demo" / "video" / "video_360p" / "track1.mp4"
    moov_track = boxes.parse_moov(track.header[28 + 8 :])[0]
    assert file.read_bytes() == cmaf.RECEIVER.init_segment(moov_track) + b"".join(
        cmaf.split_segment(track.segment(k)).fragment for k in range(2))  # fmt: skip


# --- fixed segment duration ---------------------------------------------------------------------


def timed_segments(counts: list[int], frame: int, *, last_is_lmsg: bool = False) -> list[tuple[int, bytes]]:
    """(index, segment) of track 1 with ``counts[n]`` samples of ``frame`` ticks each, back to back
    from an epoch-based time; the last one marked lmsg if ``last_is_lmsg``."""
    out, time = [], cmaf.epoch_ticks(1_767_225_600 * 10**9, 90_000) + K * 180_180
    for n, count in enumerate(counts):
        run = boxes.TrackRun(1, time, [boxes.Sample(b"\x00\x00\x00\x01", frame)] * count, K + n)
        last = last_is_lmsg and n == len(counts) - 1
        out.append((K + n, cmaf.write_segment(K + n, run, timescale=90_000, last=last)))
        time += count * frame
    return out


def push(track: Track, segments: list[tuple[int, bytes]]) -> tuple[CmafPoint, Archive, list[str]]:
    point, archive = CmafPoint(), Archive()
    assert send(point, archive, None, track.header) == Answer(200, "")
    notices = []
    for index, segment in segments:
        answer = send(point, archive, index, segment)
        assert answer == Answer(200, "")
        notices += answer.notices
    return point, archive, notices


def duration_counts(point: CmafPoint) -> tuple[int, dict]:
    status = point.status()
    return status["tolerated"].get("segment_duration", 0), status["segment_durations"]


def test_a_segment_off_the_tracks_duration_by_more_than_a_frame_is_counted_logged_once_and_archived(
        track: Track) -> None:  # fmt: skip
    """60 frames of 3003 ticks establish 180180. Within one frame (59 or 61 frames) keeps to it;
    62 and 64 frames are off at once; a 30-frame segment is off once a later segment shows it
    was not the last; the lmsg segment, however short, is exempt."""
    counts = [60, 60, 62, 59, 61, 64, 30, 60, 30]
    point, archive, notices = push(track, timed_segments(counts, 3003, last_is_lmsg=True))
    assert [d.fragment.duration for d in archive.decisions] == [n * 3003 for n in counts]  # every one archived
    assert duration_counts(point) == (3, {"live/demo/video/video_360p": {"1": {"duration": 180_180,
                                                                              "off_duration": 3}}})  # fmt: skip
    start = cmaf.epoch_ticks(1_767_225_600 * 10**9, 90_000) + K * 180_180 + 120 * 3003
    assert notices == [
        f"ingest.cmaf.segment_duration track=live/demo/video/video_360p track_id=1 index={K + 2} time={start} "
        "duration=186186 established=180180 frame=3003 note=\"the segment duration differs from the track's by "
        "more than one frame: archived; logged once per track\""]  # fmt: skip
    [stats] = point.status()["publishing_points"]["live/demo/video"]["streams"]["video_360p"]["tracks"].values()
    assert (stats["fragments_archived"], stats["gaps"], stats["conflicts"]) == (9, 0, 0)


def test_a_shorter_last_segment_without_lmsg_is_not_counted(track: Track) -> None:
    point, _, notices = push(track, timed_segments([60, 60, 30], 3003))
    assert duration_counts(point)[0] == 0
    assert notices == []


@pytest.mark.parametrize(
    ("counts", "off", "duration", "index"),
    [([30, 60, 60, 60], 0, 180_180, None),  # a short opening segment: the second sets the duration
     ([60, 120, 60, 60], 1, 180_180, 1),  # a long second segment: the third agrees with the first
     ([60, 120, 90, 60], 2, 180_180, 1),  # the third agrees with neither: the second is off, then the third
     ([30, 60], 0, 90_090, None)],  # the stream ended undecided: nothing counted
    ids=["short first", "long second", "neither", "undecided"],
)  # fmt: skip
def test_the_third_segment_tells_a_short_first_from_a_long_second(
    track: Track, counts: list[int], off: int, duration: int, index: int | None
) -> None:
    point, _, notices = push(track, timed_segments(counts, 3003))
    assert duration_counts(point) == (off, {"live/demo/video/video_360p": {"1": {"duration": duration,
                                                                                "off_duration": off}}})  # fmt: skip
    assert [n.split(" time=")[0].rsplit("index=", 1)[1] for n in notices] == ([] if index is None else
                                                                             [str(K + index)])  # fmt: skip


def test_audio_segments_of_93_or_94_frames_keep_to_the_duration(track: Track) -> None:
    """48 kHz AAC in 2 s segments: 93.75 frames of 1024 ticks each, so 94, 94, 94, 93 frames
    (96256, 96256, 96256, 95232 ticks): one frame apart, not off."""
    point, archive, notices = push(track, timed_segments([94, 94, 94, 93] * 3, 1024))
    assert sorted({d.fragment.duration for d in archive.decisions}) == [95_232, 96_256]
    assert duration_counts(point) == (0, {"live/demo/video/video_360p": {"1": {"duration": 96_256,
                                                                              "off_duration": 0}}})  # fmt: skip
    assert notices == []


def test_the_other_groups_copy_is_not_judged_twice(track: Track) -> None:
    """Only archived segments are judged: the backup's copy of an off segment is a duplicate."""
    segments = timed_segments([60, 70, 60], 3003)
    point, archive = CmafPoint(), Archive()
    for group in ("primary", "backup"):
        send(point, archive, None, track.header, group)
        for index, segment in segments:
            assert send(point, archive, index, segment, group).status == 200
    assert duration_counts(point)[0] == 1
    assert len(archive.decisions) == 3


async def test_the_server_logs_off_duration_once_and_exports_the_count(nursery, tmp_path: Path, track: Track,
                                                                      caplog) -> None:  # fmt: skip
    app = IngestApp(tmp_path / "archive")
    host, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
    base = f"http://{host}:{port}/live/demo/video/video_360p"
    async with httpx.AsyncClient() as client:
        assert (await client.put(f"{base}/init.m4s", content=track.header)).status_code == 200
        for index, segment in timed_segments([60, 60, 90, 90, 60], 3003):
            assert (await client.put(f"{base}/{index}.m4s", content=segment)).status_code == 200
        metrics = (await client.get(f"http://{host}:{port}/metrics")).text
        status = (await client.get(f"http://{host}:{port}/status")).json()
    app.close()
    logged = [r.getMessage() for r in caplog.records if "ingest.cmaf.segment_duration" in r.getMessage()]
    assert len(logged) == 1
    assert f"index={K + 2} " in logged[0]
    assert "duration=270270 established=180180 frame=3003" in logged[0]
    assert logged[0].endswith("path=/live/demo/video/video_360p/" + f"{K + 2}.m4s")
    assert status["cmaf"]["tolerated"] == {"segment_duration": 2}
    assert 'orchestrator_ingest_tolerated_total{format="cmaf",kind="segment_duration"} 2.0' in metrics
