"""The relay's intake (orchestrator/relay/intake.py): encoders as they really behave, step by
step and without a network: negative first times, mfhd across tracks, duplicates on reconnect, a
restart with a new header or the same one, rejected fragments, several tracks in one moof."""

from __future__ import annotations

from fractions import Fraction

import pytest
from relaykit import (
    FRAGMENT,
    PRIMING,
    SECOND,
    events,
    ffmpeg_body,
    fragment,
    header,
    new_post,
    two_track_fragment,
)

from orchestrator.errors import MediaError
from orchestrator.fmp4 import boxes
from orchestrator.relay.intake import Dropped, Forward, HeaderReceived, StreamTimeline, grid
from orchestrator.wire import smooth


def forwarded(evs: list[object]) -> list[tuple[int, int, int]]:
    """(track, start, index) of every fragment forwarded, in order."""
    return [(e.fragment.track_id, e.fragment.start, e.fragment.index) for e in evs if isinstance(e, Forward)]


def dropped(evs: list[object]) -> list[tuple[int, int | None, str]]:
    return [(e.track_id, e.time, e.reason) for e in evs if isinstance(e, Dropped)]


@pytest.mark.parametrize(
    ("time", "ticks", "expected"),
    [(0, Fraction(20_000_000), (0, 0)), (-PRIMING, Fraction(20_000_000), (0, -PRIMING)),
     (19_786_667, Fraction(20_000_000), (1, -213_333)), (9_999_999, Fraction(20_000_000), (0, 9_999_999)),
     (10_000_000, Fraction(20_000_000), (1, -10_000_000)),
     # 2.002 s at 90 kHz is 180,180 ticks a fragment: k = 3 is at 540,540
     (540_540, Fraction(2002, 1000) * 90000, (3, 0)), (540_540 + 3003, Fraction(2002, 1000) * 90000, (3, 3003)),
     # a grid point that is not a whole tick (2.002 s at 48 kHz: 96,096 a fragment; 1/3 s fragments...)
     (333_333, Fraction(1_000_000, 3), (1, 0)), (666_667, Fraction(1_000_000, 3), (2, 0))],
)  # fmt: skip
def test_grid_index_and_phase(time: int, ticks: Fraction, expected: tuple[int, int]) -> None:
    assert grid(time, ticks) == expected


def test_ffmpegs_push_is_forwarded_whole_with_indices_by_time_not_mfhd() -> None:
    """The field report: the first audio fragment at -213,333 (sent as 2^64 - 213,333) and mfhd
    counting both tracks' moofs. Every fragment goes on, as the exact bytes received, with the
    grid index of its time (video and audio of one period share it)."""
    body = ffmpeg_body(4)
    post = new_post()
    evs = events(post, header(), *body)
    assert isinstance(evs[0], HeaderReceived)
    assert not evs[0].changed
    assert evs[0].header.data == header()
    assert [track.track_id for track in evs[0].header.tracks] == [1, 2]
    assert forwarded(evs) == [(track, k * FRAGMENT - (PRIMING if track == 2 else 0), k)
                              for k in range(4) for track in (1, 2)]  # fmt: skip
    assert [e.fragment.data for e in evs if isinstance(e, Forward)] == body
    assert [(e.phase, e.sample_duration) for e in evs if isinstance(e, Forward)][:2] == [
        (0, FRAGMENT // 4), (-PRIMING, FRAGMENT // 4)]  # fmt: skip
    audio = [e.fragment for e in evs if isinstance(e, Forward) and e.fragment.track_id == 2]
    assert [(f.timescale, f.duration, f.continuous) for f in audio] == [(10_000_000, FRAGMENT, True)] * 4
    post.end_of_body()


def test_body_split_at_every_byte_gives_the_same_events() -> None:
    body = header() + b"".join(ffmpeg_body(2))
    whole = forwarded(events(new_post(), body))
    for split in range(0, len(body), 97):
        assert forwarded(events(new_post(), body[:split], body[split:])) == whole


def test_an_encoder_that_reconnects_and_resends_has_its_duplicates_dropped() -> None:
    timeline = StreamTimeline("video")
    first = events(new_post(timeline), header(), *ffmpeg_body(3))
    assert len(forwarded(first)) == 6
    # The encoder's new POST: the same header, its last two fragments of each track again, then new ones.
    again = events(new_post(timeline), header(), *ffmpeg_body(2, first=1), *ffmpeg_body(2, first=3))
    assert isinstance(again[0], HeaderReceived)
    assert not again[0].changed
    assert dropped(again) == [(1, FRAGMENT, "duplicate"), (2, FRAGMENT - PRIMING, "duplicate"),
                              (1, 2 * FRAGMENT, "duplicate"), (2, 2 * FRAGMENT - PRIMING, "duplicate")]  # fmt: skip
    assert forwarded(again) == [(1, 3 * FRAGMENT, 3), (2, 3 * FRAGMENT - PRIMING, 3), (1, 4 * FRAGMENT, 4),
                                (2, 4 * FRAGMENT - PRIMING, 4)]  # fmt: skip


def test_an_encoder_restarting_with_a_new_header_starts_a_new_timeline() -> None:
    timeline = StreamTimeline("video")
    events(new_post(timeline), header(), *ffmpeg_body(3))
    restarted = events(new_post(timeline), header(creator="restarted"), *ffmpeg_body(2))
    assert isinstance(restarted[0], HeaderReceived)
    assert restarted[0].changed  # the relay re-opens its outbound POSTs with the new header
    assert restarted[0].header.data == header(creator="restarted")
    assert forwarded(restarted) == [(1, 0, 0), (2, -PRIMING, 0), (1, FRAGMENT, 1), (2, FRAGMENT - PRIMING, 1)]
    assert not [e for e in restarted if isinstance(e, Forward) and e.reset]


def test_an_encoder_restarting_with_the_same_header_resets_the_timeline_of_each_track() -> None:
    """ffmpeg restarted with the same settings writes the same header and starts again at 0. Its
    fragments are not duplicates (the relay never forwarded those times recently): the first
    fragment of a track in a POST that goes back to such a time resets that track's timeline."""
    timeline = StreamTimeline("video")
    events(new_post(timeline), header(), *ffmpeg_body(3, first=100))
    restarted = events(new_post(timeline), header(), *ffmpeg_body(2))
    assert forwarded(restarted) == [(1, 0, 0), (2, -PRIMING, 0), (1, FRAGMENT, 1), (2, FRAGMENT - PRIMING, 1)]
    assert [e.fragment.track_id for e in restarted if isinstance(e, Forward) and e.reset] == [1, 2]
    # ... and the old times are forgotten: the restarted encoder may reach them again.
    later = events(new_post(timeline), header(), fragment(1, 100 * FRAGMENT, mfhd=9))
    assert forwarded(later) == [(1, 100 * FRAGMENT, 100)]


def test_within_a_post_a_track_going_back_is_rejected_and_the_post_goes_on() -> None:
    evs = events(new_post(), header(), fragment(1, 2 * FRAGMENT, mfhd=1), fragment(1, FRAGMENT, mfhd=2),
                 fragment(1, 3 * FRAGMENT, mfhd=3))  # fmt: skip
    assert forwarded(evs) == [(1, 2 * FRAGMENT, 2), (1, 3 * FRAGMENT, 3)]
    assert dropped(evs) == [(1, FRAGMENT, "rejected")]
    assert "does not follow" in next(e.detail for e in evs if isinstance(e, Dropped))


def test_an_older_fragment_never_forwarded_is_forwarded_later_in_a_post() -> None:
    """A resend from further back than the relay remembers (a fragment it never had): the
    receivers de-duplicate by time; forwarding it may fill a hole, dropping it never could."""
    timeline = StreamTimeline("video")
    events(new_post(timeline), header(), fragment(1, 0), fragment(1, 2 * FRAGMENT, mfhd=2))
    evs = events(new_post(timeline), header(), fragment(1, 0), fragment(1, FRAGMENT, mfhd=3),
                 fragment(1, 3 * FRAGMENT, mfhd=4))  # fmt: skip
    assert dropped(evs) == [(1, 0, "duplicate")]
    assert forwarded(evs) == [(1, FRAGMENT, 1), (1, 3 * FRAGMENT, 3)]


def test_a_fragment_without_tfxd_is_rejected() -> None:
    run = boxes.TrackRun(1, 0, [boxes.Sample(b"x" * 8, FRAGMENT)], 1)
    no_tfxd = boxes.write_movie_fragment(1, [run])
    evs = events(new_post(), header(), no_tfxd, fragment(1, FRAGMENT, mfhd=2))
    assert dropped(evs) == [(1, None, "rejected")]
    assert forwarded(evs) == [(1, FRAGMENT, 1)]


def test_a_two_track_fragment_is_split_per_track() -> None:
    evs = events(new_post(), header(), two_track_fragment(4 * SECOND))
    assert forwarded(evs) == [(1, 4 * SECOND, 2), (2, 4 * SECOND, 2)]
    for event in evs:
        if isinstance(event, Forward):
            parsed = smooth.parse_fragment(event.fragment.data)
            assert [t.track_id for t in parsed.trafs] == [event.fragment.track_id]
            assert parsed.trafs[0].tfxd is not None
            assert parsed.trafs[0].tfxd.absolute_time == 4 * SECOND


def test_an_undeclared_track_or_a_body_cut_mid_box_ends_the_post() -> None:
    with pytest.raises(MediaError, match="track 3"):
        events(new_post(), header(), fragment(3, 0))
    post = new_post()
    events(post, header(), fragment(1, 0)[:-3])
    with pytest.raises(MediaError, match="inside a box"):
        post.end_of_body()
    new_post().end_of_body()  # an empty body: a probe
