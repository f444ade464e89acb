"""The publishing point core against hostile or broken input (issue 13): bounded work per POST,
a memory budget across POSTs, state changed only by confirmed writes, no poisoned stream, a
redefined track in its own file, offsets counted from the start of the stream."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from receiverkit import (
    AUDIO,
    FRAME,
    PATH,
    VIDEO,
    drain,
    fragment,
    header,
    hostile_fragment,
    init,
    run,
    smil,
    trun,
    video,
)

from orchestrator.errors import IngestOverloaded, MediaError
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.reader import MAX_HEADER_BOX_SIZE, NEED_DATA
from orchestrator.ingest.receiver import (
    MAX_MANIFEST_ELEMENTS,
    Decision,
    Post,
    PublishingPoint,
    StreamPath,
    parse_stream_path,
)
from orchestrator.wire import smooth

MIB = 1024 * 1024


def feed_all(post: Post, body: bytes) -> list[Decision]:
    return drain(post, body)


# --- work per POST bounded by the bytes received ------------------------------------------------


def test_a_thousand_truns_over_the_same_bytes_are_refused_naming_the_limit() -> None:
    body = header() + hostile_fragment([trun(1, 1000)] * 1000, bytes(1000))
    post = PublishingPoint().open_post(PATH, None, 0.0)
    limit = r"fragment at offset \d+: traf of track 1 has 1000 truns, over the limit of 16"
    with pytest.raises(MediaError, match=limit):
        feed_all(post, body)


def test_two_truns_over_the_same_bytes_are_refused() -> None:
    body = header() + hostile_fragment([trun(1, 1000)] * 2, bytes(1000))
    with pytest.raises(MediaError, match="samples may not share bytes"):
        feed_all(PublishingPoint().open_post(PATH, None, 0.0), body)


def test_a_trun_of_zero_size_samples_is_refused_naming_the_limit() -> None:
    body = header() + hostile_fragment([trun(60_000, 0)], bytes(MIB))
    with pytest.raises(MediaError, match=r"more than 10000 samples, over the limit"):
        feed_all(PublishingPoint().open_post(PATH, None, 0.0), body)


def test_huge_manifest_is_refused_as_soon_as_its_size_field_arrives() -> None:
    post = PublishingPoint().open_post(PATH, None, 0.0)
    declared = 40_000_000
    manifest_start = struct.pack(">I4s", declared, b"uuid") + smooth.LIVE_SERVER_MANIFEST_UUID
    with pytest.raises(MediaError, match=f"declares {declared} bytes, over the limit of {MAX_HEADER_BOX_SIZE}"):
        feed_all(post, smooth.write_ftyp() + manifest_start)


def test_manifest_of_many_elements_is_refused_naming_the_limit() -> None:
    empty = "<smil>" + "<a/>" * 200_000 + "</smil>"  # 800 kB: under the box limit, 200,001 elements
    body = smooth.write_ftyp() + smooth.write_live_server_manifest(empty) + boxes.write_moov([VIDEO])
    with pytest.raises(MediaError, match=f"more than {MAX_MANIFEST_ELEMENTS} elements, the limit"):
        feed_all(PublishingPoint().open_post(PATH, None, 0.0), body)


# --- a memory budget across POSTs ------------------------------------------------------------------


def test_unfinished_boxes_of_many_posts_stay_within_the_budget() -> None:
    """Six POSTs each announcing a 200 MiB mdat: the third is refused, nothing near 1.2 GiB is held."""
    point = PublishingPoint(memory_budget=512 * MIB)
    moof = fragment(0)[: -(len(fragment(0)) - fragment(0).index(b"mdat") + 4)]
    opening = header() + moof + struct.pack(">I4s", 200 * MIB, b"mdat")
    outcomes = []
    for k in range(6):
        post = point.open_post(StreamPath(("live",), f"s{k}"), None, 0.0)
        try:
            feed_all(post, opening)
            outcomes.append("holding")
        except IngestOverloaded as exc:
            outcomes.append(str(exc)[-58:])
            post.close(1.0, "error", str(exc))
        assert point.memory_reserved <= point.memory_budget
    refused = "over the ingest memory budget of 536870912 bytes; retry later"[-58:]
    assert outcomes == ["holding", "holding", refused, refused, refused, refused]
    assert point.status()["memory"]["refusals"] == 4


def test_a_closed_post_gives_its_memory_back() -> None:
    point = PublishingPoint(memory_budget=MIB)
    first = point.open_post(PATH, None, 0.0)
    drain(first, header() + struct.pack(">I4s", MIB - 100, b"mdat"))
    assert point.memory_reserved == MIB - 100
    with pytest.raises(IngestOverloaded):
        drain(point.open_post(StreamPath(("live",), "other"), None, 0.0), header() + b"\0\0\x10\0free")
    first.close(1.0, "error")
    assert point.memory_reserved == 0
    decisions = drain(point.open_post(StreamPath(("live",), "other"), None, 0.0), header(), fragment(0))
    assert [d.outcome for d in decisions] == ["archived"]


# --- state changed only by a confirmed write ------------------------------------------------------


def test_a_failed_write_leaves_the_fragment_acceptable_again() -> None:
    point = PublishingPoint()
    post = point.open_post(PATH, "A", 0.0)
    post.feed(header() + fragment(0) + fragment(1))
    first = post.next_decision()
    assert isinstance(first, Decision)
    post.written(first)
    second = post.next_decision()
    assert isinstance(second, Decision)
    assert second.outcome == "archived"
    post.close(1.0, "error", "archive write failed")  # the shell could not write fragment 1
    assert video(point)["fragments_archived"] == 1

    resend = drain(point.open_post(PATH, "A", 2.0), header(), fragment(1))
    assert [(d.fragment.index, d.outcome) for d in resend] == [(1, "archived")]
    assert video(point)["fragments_archived"] == 2


def test_a_failed_init_write_is_written_again_with_the_next_fragment() -> None:
    point = PublishingPoint()
    post = point.open_post(PATH, "A", 0.0)
    post.feed(header() + fragment(0))
    decision = post.next_decision()
    assert isinstance(decision, Decision)
    assert [w.new_file for w in decision.writes] == [True, False]
    post.close(1.0, "error")
    again = drain(point.open_post(PATH, "A", 2.0), header(), fragment(0))
    assert b"".join(w.data for w in again[0].writes) == init(VIDEO) + fragment(0)


def test_an_exception_in_the_rebuild_ends_the_post_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    point = PublishingPoint()
    body = header((VIDEO, AUDIO)) + smooth.write_fragment(0, [run(0, 1), run(0, 2, duration=1024)])

    def broken(*args: object, **kwargs: object) -> bytes:
        raise struct.error("required argument is not an integer")

    with monkeypatch.context() as patch:
        patch.setattr(smooth, "write_fragment", broken)
        post = point.open_post(PATH, None, 0.0)
        with pytest.raises(MediaError, match="cannot process this stream: error: required argument"):
            drain(post, body)
        post.close(1.0, "error")
    tracks = point.status()["publishing_points"]["live/demo"]["streams"]["video"]["tracks"]
    assert [t["fragments_archived"] for t in tracks.values()] == [0, 0]
    decisions = drain(point.open_post(PATH, None, 2.0), body)
    assert [d.outcome for d in decisions] == ["archived", "archived"]


# --- fields no writer could carry: never a 500, never a poisoned stream -----------------------------


def _moov_with(track: boxes.TrackHeader, *, language_code: int | None = None) -> bytes:
    moov = boxes.write_moov([track])
    if language_code is not None:
        at = moov.index(b"mdhd") + 4 + 4 + 16  # size+type, version/flags, 4 x 32-bit fields
        moov = moov[:at] + struct.pack(">H", language_code) + moov[at + 2 :]
    return moov


@pytest.mark.parametrize(
    ("name", "opening"),
    [
        ("mdhd language 0", smooth.write_ftyp() + smooth.write_live_server_manifest(smil({1: "video"}))
         + _moov_with(VIDEO, language_code=0)),
        ("a 5,000-digit trackID in the manifest", smooth.write_ftyp() + smooth.write_live_server_manifest(
            smil({int("9" * 4000): "x", 1: "video"}).replace("9" * 4000, "9" * 5000)) + boxes.write_moov([VIDEO])),
    ],
)  # fmt: skip
def test_odd_header_fields_are_accepted_and_the_stream_stays_usable(name: str, opening: bytes) -> None:
    point = PublishingPoint()
    decisions = drain(point.open_post(PATH, None, 0.0), opening, fragment(0))
    assert [d.outcome for d in decisions] == ["archived"], name
    decisions = drain(point.open_post(PATH, None, 1.0), header(), fragment(1))
    assert [d.outcome for d in decisions] == ["archived"], name


def test_track_id_ffffffff_is_archived() -> None:
    top = boxes.TrackHeader(0xFFFFFFFF, b"vide", 90000, VIDEO.sample_entry, 192, 108)
    frag = smooth.write_fragment(0, [boxes.TrackRun(0xFFFFFFFF, 0, [boxes.Sample(b"x" * 8, FRAME)], 0)])
    decisions = drain(PublishingPoint().open_post(PATH, None, 0.0), header((top,)), frag)
    assert [d.outcome for d in decisions] == ["archived"]
    assert decisions[0].writes[0].data == smooth.write_ftyp() + boxes.write_moov([top])


def test_composition_offset_over_31_bits_is_a_clear_error_and_the_stream_goes_on() -> None:
    point = PublishingPoint()
    flags = boxes.TRUN_DATA_OFFSET | boxes.TRUN_SAMPLE_DURATION | boxes.TRUN_SAMPLE_SIZE
    flags |= boxes.TRUN_SAMPLE_COMPOSITION_TIME_OFFSET
    bad = boxes.full_box(b"trun", 0, flags, struct.pack(">IiIII", 1, 0, FRAME, 8, 2**31))
    body = header((VIDEO, AUDIO)) + hostile_fragment([bad], bytes(8))
    with pytest.raises(MediaError, match=r"composition offset 2147483648, over the limit of 2147483647"):
        drain(point.open_post(PATH, None, 0.0), body)
    assert [d.outcome for d in drain(point.open_post(PATH, None, 1.0), header(), fragment(0))] == ["archived"]


# --- one track definition per file ----------------------------------------------------------------


def test_a_redefined_track_goes_to_a_new_file_with_a_notice() -> None:
    point = PublishingPoint()
    drain(point.open_post(PATH, "A", 0.0), header(), fragment(0))
    changed = boxes.TrackHeader(1, b"vide", 30000, VIDEO.sample_entry, 192, 108)
    post = point.open_post(PATH, "A", 1.0)
    decisions = drain(post, header((changed,)), fragment(0), fragment(1))
    assert [(d.outcome, d.writes[-1].path[-1]) for d in decisions] == [
        ("archived", "video-2.mp4"),  # fragment 0 again: new to this definition's file
        ("archived", "video-2.mp4"),
    ]
    assert decisions[0].writes[0].data == init(changed)
    notices = post.take_notices()
    assert notices[0] == (
        "ingest.track.redefined stream=/live/demo.isml/Streams(video) track=1 old_file=live/demo/video/video.mp4 "
        "new_file=live/demo/video/video-2.mp4 timescale=90000->30000"
    )
    # Another header: a mismatch, and (the same group's header changed) a restart of its encoder.
    assert [n.split()[0] for n in notices[1:]] == ["ingest.stream.header_mismatch", "ingest.stream.encoder_restarted"]
    tracks = point.status()["publishing_points"]["live/demo"]["streams"]["video"]["tracks"]
    assert {key: (t["file"], t["timescale"], t["fragments_archived"]) for key, t in tracks.items()} == {
        "1": ("live/demo/video/video.mp4", 90000, 1),
        "1-2": ("live/demo/video/video-2.mp4", 30000, 2),
    }
    # The first definition again (the other group): back to the first file, duplicates dropped.
    again = drain(point.open_post(PATH, "B", 2.0), header(), fragment(0), fragment(1))
    assert [(d.outcome, d.fragment.index) for d in again] == [("duplicate", 0), ("archived", 1)]
    assert again[1].writes[-1].path[-1] == "video.mp4"


# --- names and offsets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/live/demo/video/video.mp4.isml/Streams(x)", "/live/demo.isml/Streams(audio.MP4)", "/a/b.mp4/c.isml/Streams(s)"],
)
def test_path_parts_ending_in_mp4_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match=r"ends in \.mp4, which names track files"):
        parse_stream_path(path)


def test_offsets_in_errors_count_from_the_start_of_the_stream() -> None:
    start = len(header()) + len(fragment(0))
    post = PublishingPoint().open_post(PATH, None, 0.0)
    with pytest.raises(MediaError, match=f"box b'moof' at offset {start} declares size 4, smaller than its header"):
        drain(post, header(), fragment(0), struct.pack(">I4s", 4, b"moof"))
    broken = hostile_fragment([trun(1, 8)[:-4]], bytes(8), index=1)  # the trun is short of its last field
    post = PublishingPoint().open_post(PATH, None, 0.0)
    with pytest.raises(MediaError, match=f"fragment at offset {start}: "):
        drain(post, header(), fragment(0), broken)


# --- finished streams release their state ---------------------------------------------------------


def test_finished_streams_keep_no_header_or_init_bytes() -> None:
    """Fifty streams whose headers carry a 900 kB manifest: after their POSTs end, what the
    publishing point holds is far below the 45 MB of headers it saw (it kept them all before)."""
    padding = "<!--" + "x" * 900_000 + "-->"
    point = PublishingPoint()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in range(50):
            body = header(manifest=smil({1: "video"}) + padding)
            post = point.open_post(StreamPath(("live",), f"s{k}"), None, 0.0)
            drain(post, body, fragment(0))
            post.end_of_body()
            post.close(1.0, "ok")
            del body, post
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 5_000_000, f"{held} bytes held after 50 finished streams"
    assert point.status()["posts"]["active"] == 0
    assert NEED_DATA is not None
