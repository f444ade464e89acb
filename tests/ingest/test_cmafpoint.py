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
