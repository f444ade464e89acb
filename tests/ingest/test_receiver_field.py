"""Encoders as they really behave, against the publishing point core (issue 20): step by step,
exact integers, no network. Each case is one ffmpeg 5.1 ``-f ismv`` showed (or one a real
encoder does: reconnect and resend, restart with a new header).

Every test here fails on the receiver as it was before issue 20 (see docs/ingest-field.md)."""

from __future__ import annotations

import struct

from receiverkit import AUDIO, PATH, VIDEO, drain, header, smil

from orchestrator.fmp4 import boxes
from orchestrator.ingest.receiver import Decision, Post, PublishingPoint
from orchestrator.wire import smooth

PRIMING = 1024 * 10_000_000 // 48_000  # 213,333: ffmpeg's AAC priming at 10 MHz, in ticks


def wrapped(time: int) -> int:
    """``time`` as a 64-bit unsigned field carries it (two's complement below zero)."""
    return time % (1 << 64)


def two_track_fragment(sequence: int, track_id: int, time: int, duration: int) -> bytes:
    """One traf of ``track_id`` in a moof numbered ``sequence``, tfxd v1 with the raw 64-bit
    ``time`` and no tfdt: what ffmpeg's ismv muxer writes (one track per moof, mfhd counting the
    moofs of every track)."""
    samples = [boxes.Sample(bytes([track_id, sequence % 256]) * 8, duration)]
    fragment = smooth.write_fragment(sequence, [boxes.TrackRun(track_id, 0, samples, sequence)], 1)
    # Patch the tfxd's time (write_fragment writes base_time 0 and a tfdt; ffmpeg has no tfdt,
    # the tfxd time is what the receiver reads either way).
    at = fragment.index(smooth.TFXD_UUID) + 16 + 4
    return fragment[:at] + struct.pack(">Q", wrapped(time)) + fragment[at + 8 :]


def ffmpeg_like(count: int, video_start: int = 0) -> list[bytes]:
    """``count`` fragments per track as ffmpeg interleaves them: video at 0, 2 s, 4 s ... and
    audio starting at -PRIMING, mfhd numbered 1, 2, 3 ... across both tracks."""
    out, audio_time, sequence = [], -PRIMING, 1
    for k in range(count):
        out.append(two_track_fragment(sequence, 1, video_start + k * 20_000_000, 20_000_000))
        audio_duration = 20_000_000 + (PRIMING if k == 0 else 0) - (800_000 if k == 0 else 0)
        out.append(two_track_fragment(sequence + 1, 2, audio_time, audio_duration))
        audio_time += audio_duration
        sequence += 2
    return out


TEN_MHZ_VIDEO = boxes.TrackHeader(1, b"vide", 10_000_000, VIDEO.sample_entry, 192, 108)
TEN_MHZ_AUDIO = boxes.TrackHeader(2, b"soun", 10_000_000, AUDIO.sample_entry)


def two_tracks(manifest: str | None = None) -> bytes:
    return header((TEN_MHZ_VIDEO, TEN_MHZ_AUDIO), manifest)


def tracks(point: PublishingPoint) -> dict[str, dict[str, int]]:
    return point.status()["publishing_points"]["live/demo"]["streams"]["video"]["tracks"]  # type: ignore[no-any-return]


def post_of(
    point: PublishingPoint, *chunks: bytes, group: str | None = None, now: float = 0.0
) -> tuple[Post, list[Decision]]:
    post = point.open_post(PATH, group, now)
    decisions = drain(post, *chunks)
    post.end_of_body()
    post.close(now + 1, "ok")
    return post, decisions


def test_signed_time_reads_a_wrapped_time_as_negative() -> None:
    assert smooth.signed_time(2**64 - 213_333) == -213_333
    assert smooth.signed_time(2**63) == -(2**63)
    assert smooth.signed_time(2**63 - 1) == 2**63 - 1
    assert smooth.signed_time(0xFFFF_FFFF) == 0xFFFF_FFFF  # a 32-bit (version 0) time is never negative


def test_audio_primed_before_zero_is_archived_whole() -> None:
    """ffmpeg's first AAC fragment is stamped -213,333: read unsigned it was 2**64 - 213,333, and
    every later audio fragment was rejected as "does not follow" it (2.0 s of 8 s kept)."""
    point = PublishingPoint()
    _, decisions = post_of(point, two_tracks(), *ffmpeg_like(4))
    assert [d.outcome for d in decisions] == ["archived"] * 8
    audio = tracks(point)["2"]
    assert (audio["fragments_archived"], audio["rejected"], audio["negative_times"]) == (4, 0, 1)
    assert audio["last_timestamp"] == 3 * 20_000_000 - 800_000
    assert next(d.fragment.time for d in decisions if d.fragment.track_id == 2) == -PRIMING
    # Archived as received: the tfxd keeps the encoder's bits (a player reads them as ffmpeg wrote them).
    (first_audio,) = (d for d in decisions if d.fragment.track_id == 2 and d.fragment.time == -PRIMING)
    assert struct.pack(">Q", wrapped(-PRIMING)) in first_audio.writes[-1].data
    assert point.status()["tolerated"] == {"negative_time": 1}


def test_a_negative_time_says_so_once_per_track() -> None:
    point = PublishingPoint()
    post = point.open_post(PATH, None, 0.0)
    drain(post, two_tracks(), *ffmpeg_like(3))
    (notice,) = post.take_notices()
    assert notice == ('ingest.fragment.negative_time stream=/live/demo.isml/Streams(video) track=2 time=-213333 '
                      'note="read as a signed time (encoder priming): archived"')  # fmt: skip


def test_mfhd_numbered_across_tracks_makes_no_gaps() -> None:
    """ffmpeg numbers the moofs of both tracks: video has 1, 3, 5, 7 and audio 2, 4, 6, 8. Gaps
    are judged by time: none here (the index count said 3 for each track)."""
    point = PublishingPoint()
    post_of(point, two_tracks(), *ffmpeg_like(4))
    assert {key: (t["first_index"], t["last_index"], t["gaps"]) for key, t in tracks(point).items()} == {
        "1": (1, 7, 0),
        "2": (2, 8, 0),
    }


def test_a_hole_in_time_is_a_gap_whatever_the_indices() -> None:
    """Video fragment at 4 s missing: one gap on video, none on audio, though every mfhd number
    the encoder sent is consecutive (the missing moof took no number)."""
    fragments = ffmpeg_like(4)
    del fragments[4]  # video at 4 s
    point = PublishingPoint()
    post_of(point, two_tracks(), *fragments)
    assert (tracks(point)["1"]["gaps"], tracks(point)["2"]["gaps"]) == (1, 0)
    # The encoder resends it on another POST: the hole is filled.
    post_of(point, two_tracks(), ffmpeg_like(4)[4])
    assert (tracks(point)["1"]["gaps"], tracks(point)["1"]["fragments_archived"]) == (0, 4)


def test_a_reconnecting_encoder_resends_and_duplicates_are_dropped_and_counted() -> None:
    """No probe, one POST cut after 3 fragments per track; the encoder reconnects and resends
    the last two of each before going on. Nothing is archived twice; the second POST says how
    many it dropped."""
    fragments = ffmpeg_like(6)
    point = PublishingPoint()
    post_of(point, two_tracks(), *fragments[:6])
    second, decisions = post_of(point, two_tracks(), *fragments[2:])
    assert [d.outcome for d in decisions] == ["duplicate"] * 4 + ["archived"] * 6
    assert dict(second.outcomes) == {"duplicate": 4, "archived": 6}
    assert {key: (t["fragments_archived"], t["duplicates_dropped"], t["conflicts"], t["gaps"])
            for key, t in tracks(point).items()} == {"1": (6, 2, 0, 0), "2": (6, 2, 0, 0)}  # fmt: skip
    assert point.status()["probes"] == 0
    (listed, _) = point.status(posts=True)["post_log"][::-1]
    assert listed["outcomes"] == {"archived": 6, "duplicate": 4}


def test_an_encoder_restarted_with_a_new_header_starts_new_files() -> None:
    """ffmpeg restarted with other settings: a new header, and its time starts again at zero
    (audio at -213,333). Without a new timeline every fragment of the second run was a
    "duplicate" of the first run's at the same time, and dropped."""
    point = PublishingPoint()
    post_of(point, two_tracks(), *ffmpeg_like(3))
    restarted = point.open_post(PATH, None, 10.0)
    decisions = drain(restarted, two_tracks(smil({1: "video", 2: "audio"}, creator="restarted")), *ffmpeg_like(3))
    assert [d.outcome for d in decisions] == ["archived"] * 6
    assert {d.writes[-1].path[-1] for d in decisions} == {"video-2.mp4", "audio-2.mp4"}
    assert [w.new_file for w in decisions[0].writes] == [True, False]  # the new file opens with its init
    notices = [n.split()[0] for n in restarted.take_notices()]
    assert notices == ["ingest.stream.header_mismatch", "ingest.stream.encoder_restarted", "ingest.track.new_timeline",
                       "ingest.track.new_timeline", "ingest.fragment.negative_time"]  # fmt: skip
    restarted.close(11.0, "ok")
    status = point.status()
    stream = status["publishing_points"]["live/demo"]["streams"]["video"]
    assert (stream["restarts"], stream["header_mismatches"]) == (1, 1)
    assert {key: (t["file"], t["fragments_archived"], t["gaps"]) for key, t in stream["tracks"].items()} == {
        "1": ("live/demo/video/video.mp4", 3, 0),
        "2": ("live/demo/video/audio.mp4", 3, 0),
        "1-2": ("live/demo/video/video-2.mp4", 3, 0),
        "2-2": ("live/demo/video/audio-2.mp4", 3, 0),
    }
    assert status["tolerated"] == {"encoder_restart": 1, "header_mismatch": 1, "negative_time": 2}


def test_a_restart_that_goes_on_in_time_continues_the_same_files() -> None:
    """An encoder that stamps wall-clock time comes back later in time: same files, no gap but
    the outage."""
    point = PublishingPoint()
    post_of(point, two_tracks(), *ffmpeg_like(2))
    _, decisions = post_of(point, two_tracks(smil({1: "video", 2: "audio"}, creator="restarted")),
                           *ffmpeg_like(2, video_start=40_000_000)[:1])  # fmt: skip
    assert [(d.outcome, d.writes[-1].path[-1]) for d in decisions] == [("archived", "video.mp4")]
    assert set(tracks(point)) == {"1", "2"}


def test_the_same_header_again_is_a_reconnect_not_a_restart() -> None:
    point = PublishingPoint()
    post_of(point, two_tracks(), *ffmpeg_like(3))
    _, decisions = post_of(point, two_tracks(), *ffmpeg_like(3))
    assert [d.outcome for d in decisions] == ["duplicate"] * 6
    assert point.status()["tolerated"] == {"negative_time": 1}


def test_a_header_mismatch_is_logged_at_most_once_a_minute_per_stream() -> None:
    point = PublishingPoint()
    post_of(point, header(), group="A", now=0.0)

    def mismatch_notices(group: str, now: float) -> list[str]:
        post = point.open_post(PATH, group, now)
        drain(post, header(manifest=smil({1: "video"}, creator=f"other {now}")))
        post.close(now, "ok")
        return [n for n in post.take_notices() if n.startswith("ingest.stream.header_mismatch")]

    assert mismatch_notices("B", 1.0) == [
        "ingest.stream.header_mismatch stream=/live/demo.isml/Streams(video) group=B mismatches=1 "
        'not_logged_since=0 note="the header differs from the stream\'s first; accepted (spec 7.5.c, 8.3)"'
    ]
    assert mismatch_notices("B", 30.0) == []
    assert mismatch_notices("C", 59.0) == []
    (notice,) = mismatch_notices("B", 61.0)
    assert "mismatches=4 not_logged_since=2 " in notice
    assert point.status()["publishing_points"]["live/demo"]["streams"]["video"]["header_mismatches"] == 4


def test_cmaf_detects_no_restarts() -> None:
    """CMAF feeds every segment request with the track's stored header, whichever sender stored
    it: a header change there is no restart, and the old timeline goes on (duplicates dropped)."""
    point = PublishingPoint(detect_restarts=False)
    post_of(point, two_tracks(), *ffmpeg_like(3))
    _, decisions = post_of(point, two_tracks(smil({1: "video", 2: "audio"}, creator="other")), *ffmpeg_like(3))
    assert [d.outcome for d in decisions] == ["duplicate"] * 6
    assert set(tracks(point)) == {"1", "2"}
    assert point.status()["tolerated"] == {"header_mismatch": 1, "negative_time": 1}
