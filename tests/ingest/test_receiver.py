"""Scenario tests of the publishing point core, step by step, without a network."""

from __future__ import annotations

import json
import struct

import pytest
from receiverkit import AUDIO, AVC1, FRAME, PATH, VIDEO, drain, fragment, header, init, run, smil, video

from orchestrator.errors import BoxError, MediaError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import NEED_DATA, Header
from orchestrator.ingest import receiver
from orchestrator.ingest.receiver import (
    FRAGMENT_LOG_SIZE,
    POST_LOG_SIZE,
    CheckedFragment,
    Decision,
    PostChecker,
    PublishingPoint,
    StreamPath,
    parse_stream_path,
    track_names,
)
from orchestrator.wire import smooth


def fragment_without_tfxd(index: int, time: int) -> bytes:
    """moof (mfhd, traf(tfhd, tfdt, trun)) + mdat, with no tfxd: fmp4 never writes one like this."""
    payload = b"no tfxd!"
    mfhd = boxes.full_box(b"mfhd", 0, 0, struct.pack(">I", index))
    tfhd = boxes.full_box(b"tfhd", 0, boxes.TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", 1))
    tfdt = boxes.full_box(b"tfdt", 1, 0, struct.pack(">Q", time))

    def moof(data_offset: int) -> bytes:
        flags = boxes.TRUN_DATA_OFFSET | boxes.TRUN_SAMPLE_DURATION | boxes.TRUN_SAMPLE_SIZE
        trun = boxes.full_box(b"trun", 0, flags, struct.pack(">IiII", 1, data_offset, FRAME, len(payload)))
        return boxes.box(b"moof", mfhd, boxes.box(b"traf", tfhd, tfdt, trun))

    return moof(len(moof(0)) + 8) + boxes.box(b"mdat", payload)


def outcomes(decisions: list[Decision]) -> list[tuple[int, str]]:
    return [(d.fragment.index, d.outcome) for d in decisions]


def whole_post(point: PublishingPoint, *chunks: bytes, group: str | None = None, now: float = 0.0) -> list[Decision]:
    post = point.open_post(PATH, group, now)
    decisions = drain(post, *chunks)
    post.end_of_body()
    post.close(now + 1, "ok")
    return decisions


def archived_bytes(decisions: list[Decision], name: str = "video.mp4") -> bytes:
    return b"".join(w.data for d in decisions for w in d.writes if w.path[-1] == name)


# --- one POST, byte by byte ---------------------------------------------------------------


def test_post_fed_one_byte_at_a_time() -> None:
    point = PublishingPoint()
    post = point.open_post(PATH, "A", now=100.0)
    head, frags = header(), [fragment(k) for k in range(3)]
    decisions: list[Decision] = []
    for part in (head, *frags):
        for i in range(len(part)):
            post.feed(part[i : i + 1])
            decision = post.next_decision()
            if i < len(part) - 1 or part is head:
                assert decision is NEED_DATA  # nothing is decided before the last byte of a fragment
            else:
                assert isinstance(decision, Decision)
                post.written(decision)
                assert post.next_decision() is NEED_DATA
                decisions.append(decision)
    post.end_of_body()
    post.close(101.0, "ok")

    assert outcomes(decisions) == [(0, "archived"), (1, "archived"), (2, "archived")]
    assert [w.new_file for w in decisions[0].writes] == [True, False]
    assert all(w.path == ("live", "demo", "video", "video.mp4") for d in decisions for w in d.writes)
    assert archived_bytes(decisions) == init(VIDEO) + b"".join(frags)
    assert video(point) == {
        "name": "video",
        "file": "live/demo/video/video.mp4",
        "timescale": 90000,
        "fragments_received": 3,
        "fragments_archived": 3,
        "duplicates_dropped": 0,
        "conflicts": 0,
        "rejected": 0,
        "gaps": 0,
        "negative_times": 0,
        "first_index": 0,
        "last_index": 2,
        "last_timestamp": 2 * FRAME,
    }
    (logged,) = point.status(posts=True)["post_log"]
    assert logged == {
        "id": 1,
        "publishing_point": "live/demo",
        "stream": "video",
        "encoder_group": "A",
        "started": 100.0,
        "ended": 101.0,
        "status": "ok",
        "reason": None,
        "bytes_received": len(head) + sum(map(len, frags)),
        "fragments_seen": 3,
        "outcomes": {"archived": 3},
        "fragments_not_listed": 0,
        "fragments": [
            {"track": 1, "index": k, "time": k * FRAME, "duration": FRAME, "outcome": "archived"} for k in range(3)
        ],
    }


def test_every_split_point_gives_the_same_decisions() -> None:
    body = header() + fragment(0) + fragment_without_tfxd(1, FRAME) + fragment(2)
    expected = [(0, "archived"), (1, "rejected"), (2, "archived")]
    for cut in range(len(body) + 1):
        point = PublishingPoint()
        decisions = whole_post(point, body[:cut], body[cut:])
        assert outcomes(decisions) == expected, cut
        assert archived_bytes(decisions) == init(VIDEO) + fragment(0) + fragment(2), cut


def test_checker_alone_yields_header_then_checked_fragments() -> None:
    checker = PostChecker()
    checker.feed(header() + fragment(5, tfxd_version=2) + boxes.box(b"free", b"ignored") + fragment(6))
    first = checker.next_event()
    assert isinstance(first, Header)
    assert checker.header is first
    events = [checker.next_event(), checker.next_event()]
    assert all(isinstance(e, CheckedFragment) and e.rejected is None for e in events)
    assert [e.tracks[0].index for e in events if isinstance(e, CheckedFragment)] == [5, 6]
    assert checker.next_event() is NEED_DATA
    checker.end_of_body()


# --- across POSTs and groups --------------------------------------------------------------


def test_duplicates_across_two_posts_are_dropped() -> None:
    point = PublishingPoint()
    first = whole_post(point, header(), *(fragment(k) for k in range(3)), group="A")
    second = whole_post(point, header(), *(fragment(k) for k in range(1, 4)), group="B")

    assert outcomes(first) == [(0, "archived"), (1, "archived"), (2, "archived")]
    assert outcomes(second) == [(1, "duplicate"), (2, "duplicate"), (3, "archived")]
    assert [len(d.writes) for d in second] == [0, 0, 1]  # no second init segment
    assert archived_bytes(first + second) == init(VIDEO) + b"".join(fragment(k) for k in range(4))
    counters = video(point)
    assert (counters["fragments_received"], counters["fragments_archived"], counters["duplicates_dropped"]) == (6, 4, 2)
    assert counters["conflicts"] == 0
    status = point.status(posts=True)
    assert status["posts"] == {"total": 2, "active": 0}
    assert status["publishing_points"]["live/demo"]["streams"]["video"]["posts"] == 2
    assert [p["encoder_group"] for p in status["post_log"]] == ["A", "B"]


def test_duplicate_with_another_index_or_duration_is_a_conflict() -> None:
    point = PublishingPoint()
    whole_post(point, header(), fragment(0), fragment(1), group="A")
    # Group B is misaligned: the same time with another index; group C: another duration.
    other_index = smooth.write_fragment(7, [run(7, time=0)])
    other_duration = smooth.write_fragment(1, [run(1, time=FRAME, duration=FRAME + 1)])
    decisions = whole_post(point, header(), other_index, group="B")
    decisions += whole_post(point, header(), other_duration, fragment(2), group="C")

    assert outcomes(decisions) == [(7, "duplicate"), (1, "duplicate"), (2, "archived")]
    assert [d.conflict for d in decisions] == [True, True, False]
    assert decisions[0].reason == "index 7, duration 3000; archived copy has index 0, duration 3000"
    assert decisions[1].reason == "index 1, duration 3001; archived copy has index 1, duration 3000"
    counters = video(point)
    assert (counters["duplicates_dropped"], counters["conflicts"], counters["fragments_archived"]) == (2, 2, 3)


def test_gaps_are_counted_and_a_late_fragment_fills_one() -> None:
    """A gap is a hole in time; a run of missing fragments is one gap."""
    point = PublishingPoint()
    whole_post(point, header(), fragment(0), fragment(1), fragment(3), fragment(6))
    assert (video(point)["gaps"], video(point)["first_index"], video(point)["last_index"]) == (2, 0, 6)

    late = whole_post(point, header(), fragment(2))  # a new POST may go back in time
    assert outcomes(late) == [(2, "archived")]
    assert (video(point)["gaps"], video(point)["last_timestamp"]) == (1, 6 * FRAME)
    whole_post(point, header(), fragment(4))  # splits the hole of 4 and 5: still one (5)
    assert video(point)["gaps"] == 1
    whole_post(point, header(), fragment(5))
    assert video(point)["gaps"] == 0


def test_a_different_header_is_counted_and_the_post_still_accepted() -> None:
    point = PublishingPoint()
    whole_post(point, header(), fragment(0))
    decisions = whole_post(point, header(manifest=smil({1: "video"}, creator="other")), fragment(1))

    assert outcomes(decisions) == [(1, "archived")]
    stream = point.status()["publishing_points"]["live/demo"]["streams"]["video"]
    assert stream["header_mismatches"] == 1
    whole_post(point, header(), fragment(2))  # identical to the first again
    assert point.status()["publishing_points"]["live/demo"]["streams"]["video"]["header_mismatches"] == 1


def test_streams_are_separate_by_point_and_id() -> None:
    point = PublishingPoint()
    whole_post(point, header(), fragment(0))
    other = StreamPath(("live", "demo"), "backup")
    post = point.open_post(other, None, 0.0)
    decisions = drain(post, header(), fragment(0))
    assert outcomes(decisions) == [(0, "archived")]
    assert decisions[0].writes[-1].path == ("live", "demo", "backup", "video.mp4")
    assert set(point.status()["publishing_points"]["live/demo"]["streams"]) == {"video", "backup"}
    assert point.status()["posts"] == {"total": 2, "active": 1}


# --- rejected fragments -------------------------------------------------------------------


def test_fragment_without_tfxd_is_rejected_and_the_post_goes_on() -> None:
    point = PublishingPoint()
    decisions = whole_post(point, header(), fragment(0), fragment_without_tfxd(1, FRAME), fragment(1))

    assert outcomes(decisions) == [(0, "archived"), (1, "rejected"), (1, "archived")]
    assert decisions[1].reason == "track 1: traf has no tfxd"
    assert decisions[1].fragment.time == FRAME  # from tfdt, for the log
    counters = video(point)
    assert (counters["fragments_received"], counters["rejected"], counters["fragments_archived"]) == (3, 1, 2)
    assert point.status(posts=True)["post_log"][0]["status"] == "ok"


def test_time_or_index_going_backwards_within_a_post_is_rejected() -> None:
    point = PublishingPoint()
    decisions = whole_post(
        point,
        header(),
        fragment(0),
        fragment(1),
        smooth.write_fragment(2, [run(2, time=FRAME // 2)]),  # time goes back
        smooth.write_fragment(1, [run(1, time=5 * FRAME)]),  # index repeats
        fragment(3),  # continues from the last accepted fragment
    )

    assert outcomes(decisions) == [(0, "archived"), (1, "archived"), (2, "rejected"), (1, "rejected"), (3, "archived")]
    assert decisions[2].reason == "track 1: time 1500 does not follow 3000"
    assert decisions[3].reason == "track 1: index 1 does not follow 1"
    assert (video(point)["rejected"], video(point)["fragments_archived"], video(point)["gaps"]) == (2, 3, 1)


def test_fragment_index_comes_from_tfxd_v2_before_mfhd() -> None:
    checker = PostChecker()
    tfxd_v2 = smooth.write_fragment(9, [boxes.TrackRun(1, 0, [boxes.Sample(b"x", FRAME)], 42)], tfxd_version=2)
    tfxd_v1 = smooth.write_fragment(9, [boxes.TrackRun(1, FRAME, [boxes.Sample(b"x", FRAME)], 42)], tfxd_version=1)
    checker.feed(header() + tfxd_v2 + tfxd_v1)
    checker.next_event()
    first, second = checker.next_event(), checker.next_event()
    assert isinstance(first, CheckedFragment)
    assert isinstance(second, CheckedFragment)
    assert (first.tracks[0].index, second.tracks[0].index) == (42, 9)


# --- fatal errors -------------------------------------------------------------------------


def test_moov_before_manifest_ends_the_post() -> None:
    point = PublishingPoint()
    post = point.open_post(PATH, "A", 0.0)
    manifest = smooth.write_live_server_manifest(smil({1: "video"}))
    post.feed(smooth.write_ftyp() + boxes.write_moov([VIDEO]) + manifest)
    with pytest.raises(MediaError, match="before the Live Server Manifest"):
        post.next_decision()
    post.close(1.0, "error", "moov before manifest")
    assert point.status(posts=True)["post_log"][0]["status"] == "error"
    assert point.status()["posts"]["active"] == 0


def test_malformed_box_ends_the_post() -> None:
    post = PublishingPoint().open_post(PATH, None, 0.0)
    post.feed(header() + struct.pack(">I4s", 4, b"moof"))
    with pytest.raises(BoxError, match="smaller than its header"):
        post.next_decision()


def test_fragment_for_an_undeclared_track_ends_the_post() -> None:
    post = PublishingPoint().open_post(PATH, None, 0.0)
    post.feed(header() + smooth.write_fragment(0, [run(0, track_id=2)]))
    with pytest.raises(MediaError, match="track 2, which the moov does not declare"):
        post.next_decision()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (header()[:30], "before the header"),
        (header() + fragment(0)[:-3], "inside a box"),
    ],
)
def test_body_ending_inside_a_box_is_an_error(body: bytes, message: str) -> None:
    point = PublishingPoint()
    post = point.open_post(PATH, None, 0.0)
    drain(post, body)
    with pytest.raises(MediaError, match=message):
        post.end_of_body()


def test_empty_body_is_fine() -> None:
    post = PublishingPoint().open_post(PATH, None, 0.0)
    post.end_of_body()


# --- several tracks -----------------------------------------------------------------------


def test_two_track_fragment_is_archived_per_track() -> None:
    point = PublishingPoint()
    both = (VIDEO, AUDIO)
    frags = [smooth.write_fragment(k, [run(k, 1), run(k, 2, duration=1024)], tfxd_version=2) for k in range(2)]
    decisions = whole_post(point, header(both, smil({1: "video_hi", 2: "audio_en"})), *frags)

    assert [(d.fragment.track_id, d.fragment.index, d.outcome) for d in decisions] == [
        (1, 0, "archived"),
        (2, 0, "archived"),
        (1, 1, "archived"),
        (2, 1, "archived"),
    ]
    assert archived_bytes(decisions, "video_hi.mp4") == init(VIDEO) + b"".join(
        smooth.write_fragment(k, [run(k, 1)], tfxd_version=2) for k in range(2)
    )
    assert archived_bytes(decisions, "audio_en.mp4") == init(AUDIO) + b"".join(
        smooth.write_fragment(k, [run(k, 2, duration=1024)], tfxd_version=2) for k in range(2)
    )
    tracks = point.status()["publishing_points"]["live/demo"]["streams"]["video"]["tracks"]
    assert {k: (t["name"], t["timescale"], t["last_timestamp"]) for k, t in tracks.items()} == {
        "1": ("video_hi", 90000, FRAME),
        "2": ("audio_en", 48000, 1024),
    }


def test_rejection_of_a_two_track_fragment_counts_on_both_tracks() -> None:
    point = PublishingPoint()
    frag = smooth.write_fragment(0, [run(0, 1), run(0, 2)])
    decisions = whole_post(point, header((VIDEO, AUDIO)), frag, frag)
    assert [d.outcome for d in decisions] == ["archived", "archived", "rejected", "rejected"]
    tracks = point.status()["publishing_points"]["live/demo"]["streams"]["video"]["tracks"]
    assert [(t["fragments_received"], t["rejected"]) for t in tracks.values()] == [(2, 1), (2, 1)]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({1: "video", 2: "audio"}, ["video.mp4", "audio.mp4"]),
        ({1: "../../etc/passwd", 2: "audio"}, ["track1.mp4", "audio.mp4"]),
        ({1: "same", 2: "same"}, ["same.mp4", "same-2.mp4"]),
        ({}, ["track1.mp4", "track2.mp4"]),
    ],
)
def test_track_file_names_are_safe_and_distinct(names: dict[int, str], expected: list[str]) -> None:
    point = PublishingPoint()
    decisions = whole_post(point, header((VIDEO, AUDIO), smil(names)), smooth.write_fragment(0, [run(0, 1), run(0, 2)]))
    assert [d.writes[-1].path[-1] for d in decisions] == expected


def test_track_names_from_smil() -> None:
    assert track_names(smil({1: "v", 3: "a"})) == {1: "v", 3: "a"}
    assert track_names("not xml <") == {}
    assert track_names(None) == {}


# --- paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/live/demo.isml/Streams(video)", StreamPath(("live", "demo"), "video")),
        ("/ingest.isml/streams(720p)", StreamPath(("ingest",), "720p")),
        ("/a/b/c.ISML/STREAMS(audio_en-1.x)", StreamPath(("a", "b", "c"), "audio_en-1.x")),
        ("/status", None),
        ("/live/demo.isml/Streams(video)/", None),
        ("/live/demo.isml", None),
    ],
)
def test_parse_stream_path(path: str, expected: StreamPath | None) -> None:
    assert parse_stream_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/live/../demo.isml/Streams(video)",
        "/../demo.isml/Streams(video)",
        "/live/demo.isml/Streams(..)",
        "/live//demo.isml/Streams(video)",
        "//etc/demo.isml/Streams(video)",
        "/live/demo.isml/Streams()",
        "/live/demo.isml/Streams(a/b)",
        "/live/de mo.isml/Streams(video)",
        "/live/.hidden.isml/Streams(video)",
        "/live/démo.isml/Streams(video)",
    ],
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="unsafe name"):
        parse_stream_path(path)


# --- bounded memory, JSON -----------------------------------------------------------------


def test_post_log_is_bounded() -> None:
    point = PublishingPoint()
    for _ in range(POST_LOG_SIZE + 5):
        point.open_post(PATH, None, 0.0).close(1.0, "disconnected")
    log = point.status(posts=True, limit=POST_LOG_SIZE + 1000)["post_log"]
    assert [p["id"] for p in log] == list(range(6, POST_LOG_SIZE + 6))
    assert [p["id"] for p in point.status(posts=True)["post_log"]] == list(range(156, POST_LOG_SIZE + 6))
    assert point.status()["posts"] == {"total": POST_LOG_SIZE + 5, "active": 0}


def test_fragment_log_of_a_post_is_bounded() -> None:
    point = PublishingPoint()
    count = FRAGMENT_LOG_SIZE + 5
    whole_post(point, header(), b"".join(fragment(k) for k in range(count)))
    (logged,) = point.status(post_id=1)["post_log"]
    assert logged["fragments_seen"] == count
    assert [f["index"] for f in logged["fragments"]] == list(range(5, count))
    (listed,) = point.status(posts=True)["post_log"]  # the list of POSTs shows the last few of each
    assert [f["index"] for f in listed["fragments"]] == list(range(count - receiver.STATUS_FRAGMENTS, count))
    assert listed["fragments_not_listed"] == count - receiver.STATUS_FRAGMENTS


def test_status_is_json() -> None:
    point = PublishingPoint()
    point.record_probe()
    whole_post(point, header(), fragment(0), fragment_without_tfxd(1, FRAME), group="A")
    status = point.status(posts=True)
    assert json.loads(json.dumps(status)) == status
    assert status["probes"] == 1


def test_dedup_index_is_bounded_and_an_older_fragment_is_still_a_duplicate(monkeypatch) -> None:
    monkeypatch.setattr(receiver, "DEDUP_WINDOW", 4)
    point = PublishingPoint()
    first = whole_post(point, header(), b"".join(fragment(k) for k in range(10)))
    assert [d.outcome for d in first] == ["archived"] * 10
    (track,) = point._streams[PATH].tracks.values()  # keyed by (track ID, init digest)
    assert len(track.by_time) == 4  # not 10
    assert len(track.times) == 4
    # The backup sends the same ten: the six the index forgot are still duplicates, never archived twice.
    again = whole_post(point, header(), b"".join(fragment(k) for k in range(10)))
    assert [d.outcome for d in again] == ["duplicate"] * 10
    assert (video(point)["fragments_archived"], video(point)["duplicates_dropped"], video(point)["gaps"]) == (10, 10, 0)
    # A new fragment after a gap is archived, and the gap is counted.
    assert outcomes(whole_post(point, header(), fragment(12))) == [(12, "archived")]
    assert video(point)["gaps"] == 1  # 10 and 11: one hole


def test_fragment_log_shrinks_with_many_active_posts(monkeypatch) -> None:
    monkeypatch.setattr(receiver, "FRAGMENT_LOG_BUDGET", 30)
    point = PublishingPoint()
    posts = [point.open_post(StreamPath(("live", "demo"), f"s{i}"), None, 0.0) for i in range(4)]
    sizes = [post._record.fragments.maxlen for post in posts]
    assert sizes == [30, 15, 10, receiver.FRAGMENT_LOG_MIN]  # budget // active, at least the minimum (30 // 4 = 7)
    drain(posts[3], header(), b"".join(fragment(k) for k in range(25)))
    assert len(posts[3]._record.fragments) == receiver.FRAGMENT_LOG_MIN


@pytest.mark.parametrize(("handler", "gaps"), [(b"vide", 2), (b"meta", 0), (b"hint", 2)])
def test_a_missing_index_is_a_gap_only_on_a_continuous_track(handler: bytes, gaps: int) -> None:
    """Indices 0, 5 and 9 archived: two holes in time. A sparse (``meta``) track has them missing by
    design; a handler no kind uses counts as continuous, as every track did before kinds."""
    point = PublishingPoint()
    track = boxes.TrackHeader(1, handler, 90000, AVC1, 192, 108)
    decisions = whole_post(point, header((track,)), fragment(0), fragment(5), fragment(9))
    assert outcomes(decisions) == [(0, "archived"), (5, "archived"), (9, "archived")]
    status = video(point)
    assert (status["first_index"], status["last_index"], status["gaps"]) == (0, 9, gaps)
