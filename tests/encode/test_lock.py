"""The content lock's arithmetic: file loop timing, the ffconcat list, positions, expressions."""

from __future__ import annotations

from fractions import Fraction

import pytest

from orchestrator.clock import TrackClock, live_index
from orchestrator.encode.lock import (
    MAX_PLAYLIST_ENTRIES,
    PTS_WRAP,
    FileLockError,
    LiveLock,
    choose_live_lock,
    content_offset_ns,
    converge,
    file_entries,
    file_timing,
    live_clock_shift,
    pattern_box_x,
    position,
    tone_expression,
)

VIDEO = TrackClock(0, Fraction(2), 90000, Fraction(1001, 30000))
AUDIO = TrackClock(0, Fraction(2), 48000, Fraction(1024, 48000))


def probe(*, rate="30000/1001", real="30000/1001", packets="120", audio=True):
    streams: list[dict[str, object]] = [
        {"codec_type": "video", "avg_frame_rate": rate, "r_frame_rate": real, "nb_read_packets": packets}]  # fmt: skip
    if audio:
        streams.append({"codec_type": "audio", "sample_rate": "48000"})
    return {"streams": streams}


def test_the_loop_is_the_decoded_audio_length_when_there_is_audio():
    timing = file_timing(probe(), 192_224, needs_video=True, needs_audio=True)
    assert timing.loop == Fraction(192_224, 48000)
    assert (timing.video_frames, timing.frame_rate, timing.audio_samples) == (120, Fraction(30000, 1001), 192_224)
    silent = file_timing(probe(audio=False), None, needs_video=True, needs_audio=False)
    assert silent.loop == Fraction(120 * 1001, 30000)  # 4.004 s: frames / rate


@pytest.mark.parametrize(
    ("kwargs", "samples", "needs_audio", "reason"),
    [
        ({"audio": False}, None, True, "has no audio stream, and the profile has audio tracks"),
        ({"rate": "25/1", "real": "50/1"}, 100_000, True, "frame rate is not constant"),
        ({"packets": "0"}, 192_192, True, "frame count is unknown"),
        ({}, 0, True, "audio stream is empty"),
        ({}, 192_192 + 1602, True, "differ by more than one frame: the file cannot loop cleanly"),
    ],
)
def test_a_file_that_cannot_loop_cleanly_is_refused_with_the_reason(kwargs, samples, needs_audio, reason):
    with pytest.raises(FileLockError, match=reason):
        file_timing(probe(**kwargs), samples, needs_video=True, needs_audio=needs_audio)


def test_a_file_at_the_track_rate_shows_frame_n_mod_n_and_audio_sample_exact():
    loop = Fraction(120 * 1001, 30000)
    for n in (0, 1, 119, 120, 121, 10**9 + 7):
        assert position(VIDEO, n, loop) == (n % 120) * VIDEO.frame_duration
    audio_loop = Fraction(192_000, 48000)
    for n in (0, 187, 188, 10**8):
        assert position(AUDIO, n, audio_loop) * 48000 == (1024 * n) % 192_000


def test_the_playlist_opens_at_the_in_point_and_each_pass_starts_exactly_one_loop_later():
    loop, inpoint = Fraction(4004, 1000) + Fraction(1, 3 * 10**6), Fraction(1, 3)
    text = file_entries("/m/it's.mp4", inpoint, loop)
    lines = text.splitlines()
    assert lines[:6] == ["ffconcat version 1.0", "file '/m/it'\\''s.mp4'", "inpoint 0.333333", "duration 3.670667",
                         "file '/m/it'\\''s.mp4'", "duration 4.004000"]  # fmt: skip
    durations = [round(Fraction(line.split()[1]) * 10**6) for line in lines if line.startswith("duration")]
    assert len(durations) == min(MAX_PLAYLIST_ENTRIES, int(86400 // loop) + 2)
    # Rounded per entry but never accumulated: every pass starts within 0.5 us of k*L - inpoint.
    start = 0
    for k, d in enumerate(durations, start=1):
        start += d
        assert abs(start - (k * loop - inpoint) * 10**6) <= Fraction(1, 2)


def test_content_offset_is_the_same_whatever_the_frame_when_locked():
    loop = Fraction(4)
    assert {content_offset_ns(VIDEO, n, loop) for n in (0, 7, 120, 10**9)} == {0}
    assert content_offset_ns(VIDEO, 12345, None) == 0


def test_pattern_expressions_are_functions_of_the_shared_frame_and_sample():
    assert pattern_box_x(1000) == "(main_w-overlay_w)*abs(mod(n+40,120)-60)/60"  # 1000 mod 120
    # Shared sample 48000*5 + 12: on the pip (first 100 ms of the second), phase 12 samples in.
    assert tone_expression(48000 * 5 + 12, 48000, 1000) == (
        "0.5*sin(2*PI*1000*mod(n+12,48000)/48000)*lt(mod(n+12,48000),4800)")  # fmt: skip


# --- live ------------------------------------------------------------------------------------

NOW = 2_541_394_470_267  # a shared-clock tick (90 kHz) in late 2026


def test_a_new_live_lock_puts_the_newest_source_frame_at_now():
    lock = LiveLock.establish(pts=1_000_000, now_tick=NOW)
    assert lock.effective(1_000_000, NOW) == (NOW - 1_000_000, 0)
    assert 0 <= lock.offset < PTS_WRAP
    assert lock.effective(1_000_000, NOW)[0] % PTS_WRAP == lock.offset


def test_a_group_that_sees_the_frame_later_or_with_a_skewed_clock_maps_it_to_the_same_tick():
    lock = LiveLock.establish(pts=5_000, now_tick=NOW)
    # 0.35 s later (path delay + clock skew): same mapping, a residual of 0.35 s, still fitting.
    effective, residual = lock.effective(5_000, NOW + 31_500)
    assert 5_000 + effective == NOW
    assert residual == -31_500
    assert lock.fits(5_000, NOW + 31_500)


def test_the_33_bit_wrap_is_unwrapped_and_a_jump_is_a_discontinuity():
    lock = LiveLock.establish(pts=PTS_WRAP - 900, now_tick=NOW)  # 10 ms before the wrap
    # 1 s later the source's timestamps have wrapped to 89_100: the same timeline.
    effective, residual = lock.effective(89_100, NOW + 90_000)
    assert residual == 0
    assert 89_100 + effective == NOW + 90_000
    # A source restarted at 0 an hour of timestamps away is another timeline.
    assert not lock.fits(0, NOW + 90_000 * 3600)
    assert not lock.fits(PTS_WRAP // 2, NOW)


@pytest.mark.parametrize("pts", [5_000, PTS_WRAP - 450_000])  # mid-range, and 5 s before the 33-bit wrap
def test_the_fits_window_is_10_s_either_way_and_not_one_tick_more(pts):
    """At its edges: a source whose newest frame maps to now +-10 s (900,000 ticks) keeps its
    mapping, one tick beyond does not; a source that jumps 30 s is on another timeline, in either
    direction, and a 30 s jump re-establishes rather than keeping a mapping 30 s off the clock."""
    lock = LiveLock.establish(pts, NOW)
    for ahead in (0, 1, 899_999, 900_000):
        assert lock.fits(pts, NOW - ahead), ahead  # the source's frame maps ahead of now
        assert lock.fits(pts, NOW + ahead), ahead  # ... or behind it
        assert lock.effective(pts, NOW + ahead)[1] == -ahead
    assert not lock.fits(pts, NOW - 900_001)
    assert not lock.fits(pts, NOW + 900_001)
    jumped = (pts + 30 * 90000) % PTS_WRAP  # the sender restarted 30 s of timestamps further on
    assert not lock.fits(jumped, NOW)
    assert not lock.fits((pts - 30 * 90000) % PTS_WRAP, NOW)
    assert choose_live_lock(jumped, NOW, [lock], lock) == (LiveLock.establish(jumped, NOW), "established")


def test_the_earliest_established_mapping_that_fits_wins_among_peers_and_saved_else_a_new_one():
    peer = LiveLock.establish(7, NOW, established_ms=1_000, by="primary")
    saved = LiveLock.establish(7, NOW - 90_000 * 3, established_ms=2_000, by="backup")
    stale = LiveLock.establish(7, NOW - 90_000 * 3600, established_ms=10, by="primary")  # another timeline
    assert choose_live_lock(7, NOW + 9_000, [stale, peer], saved) == (peer, "peer")
    older = LiveLock(saved.offset, 500, "backup")  # our own mapping is the older one: we keep it
    assert choose_live_lock(7, NOW, [stale, peer], older) == (older, "saved")
    assert choose_live_lock(7, NOW, [stale], saved) == (saved, "saved")
    fresh, origin = choose_live_lock(7, NOW, [stale], None, now_ms=5_000, group="backup")
    assert (fresh, origin) == (LiveLock.establish(7, NOW, established_ms=5_000, by="backup"), "established")
    with pytest.raises(ValueError, match="modulo 2"):
        LiveLock(PTS_WRAP)


def test_the_exported_content_offset_is_the_same_for_groups_on_one_lock():
    lock = LiveLock.establish(123_456, NOW)
    assert lock.content_offset_seconds() == ((123_456 - NOW) % PTS_WRAP) / 90000
    assert live_clock_shift(NOW - 123_456) == f"PTS+{NOW - 123_456}/90000/TB"


# --- restarts, swept: every instance of every group shows position(n) at shared frame n ----------------

SWEEP_PROFILE = """
[presentation]
name = "sweep"
fragment_duration = 2
epoch = 2026-01-01T00:00:00Z
[[streams]]
id = "av"
  [[streams.tracks]]
  kind = "video"
  name = "video"
  bitrate = 500_000
  width = 320
  height = 180
  frame_rate = "{rate}"
{audio}
[groups.primary]
encoder = {{ backend = "ffmpeg", source = {{ kind = "file", path = "clip.mp4" }} }}
  [[groups.primary.endpoints]]
  name = "a"
  region = "eu-west"
  url = "http://127.0.0.1:1/live/sweep.isml"
[groups.backup]
encoder = {{ backend = "ffmpeg", source = {{ kind = "file", path = "clip.mp4" }} }}
  [[groups.backup.endpoints]]
  name = "b"
  region = "eu-north"
  url = "http://127.0.0.1:2/live/sweep.isml"
"""
SWEEP_AUDIO = """  [[streams.tracks]]
  kind = "audio"
  name = "audio"
  bitrate = 64_000
  sample_rate = 48000
  channels = 1
"""
# (frame rate, video frames, decoded audio samples): lengths that are and are not a multiple of the
# 2 s fragment, a loop equal to the video (64 s, 3000 AAC frames) and a few samples longer (60 s
# decodes to 2,880,512 samples), and the 4.004 s NTSC clip of the picture tests.
SWEEP_CLIPS = [("25", 1600, 3_072_000), ("25", 1500, 2_880_512), ("25", 1525, 2_928_640),
               ("30000/1001", 120, 192_224)]  # fmt: skip
SWEEP_PHASES = [Fraction(i, 8) * 2 + Fraction(13, 1000) for i in range(8)]  # of the 2 s fragment
SWEEP_DELAYS = [Fraction(33, 10), Fraction(65, 10), Fraction(777, 100), Fraction(1234, 100)]  # backup's late start
LATENCY_NS = 400_000_000  # a fragment reaches the group this long after its end (encoder delay)
T0_NS = 1_796_000_000_123_456_789  # the primary's start: 2026-11-30, not on any boundary


def _list_entries(text: str) -> list[tuple[int, int]]:
    """(in-point, duration) of each ffconcat entry, in microseconds."""
    entries: list[tuple[int, int]] = []
    inpoint = 0
    for line in text.splitlines()[:200]:  # the few passes a check plays through
        key, _, value = line.partition(" ")
        if key == "inpoint":
            inpoint = round(Fraction(value) * 10**6)
        elif key == "duration":
            entries.append((inpoint, round(Fraction(value) * 10**6)))
            inpoint = 0
    return entries


def _shown_us(entries: list[tuple[int, int]], t_us: Fraction) -> Fraction:
    """The file position (us) that an ffconcat list shows at ``t_us`` after its start: what
    ffmpeg's concat demuxer and ``fps``/``atrim`` from 0 make of it."""
    start = 0
    for inpoint, duration in entries:
        if t_us < start + duration:
            return t_us - start + inpoint
        start += duration
    raise AssertionError("the list ended")


def _instance_content(encodes, timing, now_ns: int, requested: int, fragments: int) -> tuple[int, dict]:
    """Start an instance as run_ffmpeg_encoder does (plan_instance, TrackRecutter); feed each
    recutter numbered samples (output frame m carries m); returns the first index and, per
    track and shared frame n, the file position (us) the output frame re-cut as n shows."""
    from orchestrator.encode.ffmpeg_command import plan_instance, priming_frames
    from orchestrator.encode.recut import TrackRecutter
    from orchestrator.fmp4.boxes import Sample

    start = plan_instance(encodes, now_ns, requested, timing=timing, source_path="clip.mp4")
    assert start.playlists is not None
    shown: dict[tuple[int, int], Fraction] = {}
    for encode, anchor in zip(encodes, start.anchors, strict=True):
        text = start.playlists[0 if encode.is_video else 1]
        assert text is not None
        entries = _list_entries(text)
        recutter = TrackRecutter(encode.clock, anchor=anchor, first_index=start.first_index,
                                 priming_frames=priming_frames(encode))  # fmt: skip
        output = -priming_frames(encode)  # the encoder's priming frames come first, then output frame 0
        end = encode.clock.first_frame(start.first_index + fragments)
        while recutter.next_frame < end:
            cut = recutter.push(Sample(output.to_bytes(8, "big", signed=True), 1, True))
            output += 1
            if cut is None:
                continue
            for i, sample in enumerate(cut.samples):
                n = encode.clock.first_frame(cut.index) + i
                m = int.from_bytes(sample.data, "big", signed=True)
                shown[encode.track_id, n] = _shown_us(entries, m * encode.clock.frame_duration * 10**6)
    return start.first_index, shown


@pytest.mark.parametrize(("rate", "frames", "samples"), SWEEP_CLIPS)
@pytest.mark.parametrize("audio", [True, False], ids=["audio", "no_audio"])
@pytest.mark.parametrize("ending", ["killed", "exited"])
def test_every_restart_shows_the_clock_position_whatever_the_phase_the_delay_and_the_clip(
    rate, frames, samples, audio, ending
):
    """The issue-18 scenario as exact integers: the primary starts at T0, the backup some
    seconds later (never a multiple of the fragment), the primary's ffmpeg ends 15 s + a phase
    of a fragment into its run (killed: restarted at once; exited by itself: after the 0.5 s
    back-off of a second failure) and the group restarts it at the live fragment or the one after
    the last it emitted. In every instance, every re-cut frame n shows the file at position(n)
    (to the microsecond of the ffconcat list), so fragment k is the same in every group."""
    from orchestrator.encode.ffmpeg_command import plan_encodes
    from orchestrator.profile import parse_profile

    profile = parse_profile(SWEEP_PROFILE.format(rate=rate, audio=SWEEP_AUDIO if audio else ""), "sweep.toml")
    encodes = plan_encodes(profile)
    probed = probe(rate=rate, real=rate, packets=str(frames), audio=audio)
    timing = file_timing(probed, samples if audio else None, needs_video=True, needs_audio=audio)
    clocks = [e.clock for e in encodes]
    d_ns = 2 * 10**9

    def check(shown):
        for (track_id, n), at in shown.items():
            encode = encodes[track_id - 1]
            expected = position(encode.clock, n, timing.loop) * 10**6
            off = (at - expected) % (timing.loop * 10**6)  # at a seam, the end of a pass is its next start
            assert min(off, timing.loop * 10**6 - off) <= 1, (track_id, n, float(off) / 10**6)

    for delay in SWEEP_DELAYS:
        backup_ns = T0_NS + int(delay * 10**9)
        _, shown = _instance_content(encodes, timing, backup_ns, live_index(clocks, backup_ns), 2)
        check(shown)
    _, shown = _instance_content(encodes, timing, T0_NS, live_index(clocks, T0_NS), 1)
    check(shown)
    for phase in SWEEP_PHASES:
        kill_ns = (T0_NS + 15 * 10**9) // d_ns * d_ns + int(phase * 10**9)
        last = live_index(clocks, kill_ns - LATENCY_NS) - 1  # what the group had emitted
        restart_ns = kill_ns + (0 if ending == "killed" else 500_000_000)
        requested = max(live_index(clocks, restart_ns), last + 1)
        again, shown = _instance_content(encodes, timing, restart_ns, requested, 3)
        assert again >= requested
        check(shown)


def test_the_measured_offset_counts_file_frames_between_what_ffmpeg_delivered_and_the_lock():
    """0 for the picture the lock puts at frame n, +-k for a picture k frames later/earlier,
    folded into [-N/2, N/2): the 50-frame offset of issue 18 reads 50 (2 s at 25 fps)."""
    from orchestrator.encode.lock import measured_offset_frames

    pal = TrackClock(0, Fraction(2), 90000, Fraction(1, 25))
    exact = file_timing(probe(rate="25", real="25", packets="1600"), 3_072_000, needs_video=True, needs_audio=True)
    longer = file_timing(probe(rate="25", real="25", packets="1500"), 2_880_512, needs_video=True, needs_audio=True)
    n = 729_487_550  # clip frame n mod 1600 = 1150
    assert measured_offset_frames(pal, n, 1150, exact) == 0
    assert measured_offset_frames(pal, n, 1100, exact) == -50
    assert measured_offset_frames(pal, n, 1200, exact) == 50
    assert measured_offset_frames(pal, n + 450, 0, exact) == 0  # across the seam: 1600 -> 0
    assert measured_offset_frames(pal, n + 450, 1599, exact) == -1
    # A loop 0.2667 frames longer than the video: the nearest file frame, whatever the pass.
    for m in (n, n + 1, n + 1500, n + 10**6):
        nearest = int(position(pal, m, longer.loop) * 25 + Fraction(1, 2)) % 1500
        assert measured_offset_frames(pal, m, nearest, longer) == 0
        assert measured_offset_frames(pal, m, (nearest + 50) % 1500, longer) == 50


def test_at_a_seam_of_a_loop_longer_than_the_video_the_last_frame_shows_until_the_next_pass_is_nearer():
    """A 60 s clip at 25 fps whose AAC decodes to 2,880,512 samples (L = 60.0107 s): frame 0 of
    the next pass is at L, so a slot between 59.98 s and L - 0.02 s shows frame 1499 again, as
    ffmpeg did (issue-18 runs on the real ffmpeg: shared frame 730742386 at position 59.984 s
    showed 1499, the next 0); the rounding of position mod L alone said 0 (a -0.04 s offset)."""
    from orchestrator.encode.lock import locked_frame, measured_offset_frames

    pal = TrackClock(0, Fraction(2), 90000, Fraction(1, 25))
    longer = file_timing(probe(rate="25", real="25", packets="1500"), 2_880_512, needs_video=True, needs_audio=True)
    assert position(pal, 730742386, longer.loop) == Fraction(7498, 125)  # 59.984 s
    assert [locked_frame(pal, n, longer) for n in range(730742383, 730742390)] == [1497, 1498, 1499, 1499, 0, 1, 2]
    assert measured_offset_frames(pal, 730742386, 1499, longer) == 0
    assert measured_offset_frames(pal, 730742387, 0, longer) == 0
    # a loop exactly N frames long: the rounding alone, as before (1600 -> 0 at the seam)
    exact = file_timing(probe(rate="25", real="25", packets="1600"), 3_072_000, needs_video=True, needs_audio=True)
    assert [locked_frame(pal, n, exact) for n in range(729_487_998, 729_488_002)] == [1598, 1599, 0, 1]


# --- live groups converge on one mapping while running ------------------------------------------------

FRAME_TICKS = 3600  # one frame at 25 fps


def run_checks(locks: dict[str, LiveLock], reachable: dict[str, set[str]], rounds: int = 3) -> dict[str, LiveLock]:
    """Each round every group reads the peers it can reach and moves if converge says so (the
    shell does this every PEER_CHECK seconds, and moves at the next fragment boundary)."""
    for _ in range(rounds):
        seen = dict(locks)  # all groups check against the same published state
        for group, own in seen.items():
            target = converge(own, [seen[peer] for peer in sorted(reachable[group])])
            if target is not None:
                locks[group] = target
    return locks


def test_groups_started_together_agree_on_the_earliest_established_mapping_ties_by_name():
    # Both establish on their own (empty state, same moment): 2 frames apart (the backup's clock is 0.2 s ahead
    # and its path 0.12 s longer), established at the same millisecond: the name breaks the tie.
    primary = LiveLock.establish(5_000, NOW, established_ms=1_000, by="primary")
    backup = LiveLock.establish(5_000, NOW + 2 * FRAME_TICKS, established_ms=1_000, by="backup")
    assert converge(primary, [backup]) == backup
    assert converge(backup, [primary]) is None
    both = run_checks({"primary": primary, "backup": backup}, {"primary": {"backup"}, "backup": {"primary"}}, 1)
    assert both == {"primary": backup, "backup": backup}  # one check: converged
    # A millisecond earlier wins whatever the name.
    early = LiveLock(primary.offset, 999, "primary")
    assert converge(backup, [early]) == early
    assert converge(early, [backup]) is None


def test_three_groups_converge_in_one_check_whoever_started_first():
    locks = {name: LiveLock.establish(77, NOW + i * FRAME_TICKS, established_ms=2_000 - i, by=name)
             for i, name in enumerate(["a", "b", "c"])}  # fmt: skip
    everyone = {g: {p for p in locks if p != g} for g in locks}
    assert set(run_checks(dict(locks), everyone, 1).values()) == {locks["c"]}  # established first (1998)


def test_an_unreachable_peer_keeps_each_its_mapping_and_they_converge_when_it_answers():
    primary = LiveLock.establish(5_000, NOW, established_ms=1_000, by="primary")
    backup = LiveLock.establish(5_000, NOW + 2 * FRAME_TICKS, established_ms=1_001, by="backup")
    alone = {"primary": set[str](), "backup": set[str]()}
    assert run_checks({"primary": primary, "backup": backup}, alone) == {"primary": primary, "backup": backup}
    back = {"primary": {"backup"}, "backup": {"primary"}}
    assert run_checks({"primary": primary, "backup": backup}, back) == {"primary": primary, "backup": primary}
    # Only one direction answers (a firewall): the one that sees the older mapping moves; the other stays.
    one_way = {"primary": set[str](), "backup": {"primary"}}
    assert run_checks({"primary": primary, "backup": backup}, one_way) == {"primary": primary, "backup": primary}


def test_after_a_discontinuity_the_old_timeline_is_ignored_and_the_new_mappings_converge():
    old = LiveLock.establish(5_000, NOW, established_ms=1_000, by="primary")
    # The sender restarted at pts 0: each group's restart finds that no mapping fits and establishes.
    later = NOW + 90_000 * 60
    primary_new, origin = choose_live_lock(0, later, [old], old, now_ms=61_000, group="primary")
    assert origin == "established"
    assert not old.same_timeline(primary_new)
    assert converge(primary_new, [old]) is None  # a peer still on the old timeline is not followed
    backup_new, _ = choose_live_lock(0, later + FRAME_TICKS, [old], None, now_ms=61_040, group="backup")
    assert converge(backup_new, [primary_new]) == primary_new
    # A group restarting later finds the agreed one among the fitting peers.
    assert choose_live_lock(450, later + 500, [backup_new, primary_new], None) == (primary_new, "peer")


def test_peer_locks_are_read_with_their_identity_from_a_metrics_page():
    from orchestrator.encode.ffmpeg import parse_peer_locks

    page = (
        "# TYPE orchestrator_live_lock_offset_ticks gauge\n"
        'orchestrator_live_lock_offset_ticks{group="primary"} 7363495620.0\n'
        'orchestrator_live_lock_offset_ticks{group="backup"} 12.0\n'
        "# TYPE orchestrator_live_lock_established_ms gauge\n"
        'orchestrator_live_lock_established_ms{group="primary",established_by="backup"} 1796000000123.0\n'
    )
    assert parse_peer_locks(page, "backup") == [LiveLock(7363495620, 1_796_000_000_123, "backup")]
    assert parse_peer_locks(page, "spare") == [LiveLock(7363495620, 1_796_000_000_123, "backup"), LiveLock(12)]


def test_the_exported_file_content_offset_is_what_ffmpeg_reported_delivering_not_the_formula():
    """The shell's path: ffmpeg's report (output frame m is the packet at byte position pos) is
    what the metric and /status show for the fragment that opens with frame m."""
    from types import SimpleNamespace

    from orchestrator.encode.ffmpeg import _Recut
    from orchestrator.encode.ffmpeg_command import plan_encodes, plan_instance
    from orchestrator.encode.recut import TrackRecutter
    from orchestrator.fmp4.boxes import Sample
    from orchestrator.ops.metrics import Metrics
    from orchestrator.ops.state import EncoderState
    from orchestrator.profile import parse_profile

    profile = parse_profile(SWEEP_PROFILE.format(rate="25", audio=""), "sweep.toml")
    encodes = plan_encodes(profile)
    positions = tuple(1000 + 97 * j for j in range(1600))  # the file's video packets, by frame
    timing = file_timing(probe(rate="25", real="25", packets="1600", audio=False), None, needs_video=True,
                         needs_audio=False)  # fmt: skip
    timing = type(timing)(timing.loop, 1600, timing.frame_rate, None, None, positions)
    start = plan_instance(encodes, T0_NS, live_index([encodes[0].clock], T0_NS))
    anchor, clock = start.anchors[0], encodes[0].clock
    sink = SimpleNamespace(states={"av": EncoderState("primary", "av")}, fragment=lambda f: None)
    wall = SimpleNamespace(now_ns=lambda: T0_NS)
    metrics = Metrics()
    recutter = TrackRecutter(clock, anchor=anchor, first_index=start.first_index)
    output = _Recut(profile, encodes, [recutter], sink, group="primary", wall=wall, metrics=metrics)  # type: ignore[arg-type]
    output.header_seen, output.lock_origin = True, "file"
    output.probe(encodes[0], anchor, timing)

    def fragment_from(m_first: int, shown: int) -> float | None:
        """ffmpeg reports output frame m_first as file frame ``shown``; its fragment is re-cut."""
        output.delivered(m_first, positions[shown])
        samples = [Sample(b"x", 1, i == 0) for i in range(clock.frame_count(recutter.index))]
        output.fragment(SimpleNamespace(parsed=SimpleNamespace(trafs=[SimpleNamespace(track_id=1, samples=samples)])))
        return metrics.registry.get_sample_value("orchestrator_content_offset_seconds",
                                                 {"stream": "av", "group": "primary", "track": "video"})  # fmt: skip

    # Skip the frames before the first whole fragment (encoded, discarded by the recutter).
    for _ in range(clock.first_frame(start.first_index) - anchor):
        recutter.push(Sample(b"x", 1, False))
    n = clock.first_frame(start.first_index)
    assert fragment_from(n - anchor, n % 1600) == 0.0  # what the lock puts there
    n = clock.first_frame(start.first_index + 1)
    assert fragment_from(n - anchor, (n + 50) % 1600) == 2.0  # a fragment ahead
    assert sink.states["av"].lock == "file"
    assert sink.states["av"].content_offset == 2.0


def test_agreement_with_each_peer_from_one_reading():
    """Per peer group: agrees (same offset), differs by N ticks (same timeline, the shorter way
    round the 33-bit wrap), other timeline (beyond the 10 s window), unreachable, no mapping."""
    from orchestrator.encode.lock import peer_agreement
    from orchestrator.ops.state import PeerAgreement

    own = LiveLock(5_000, 1_796_000_000_000, "primary")
    answers = [
        ("http://b:9464/metrics", [("backup", LiveLock(5_000, 1_796_000_000_400, "backup")),
                                   ("spare", LiveLock(23_000, 1_796_000_000_900, "spare"))]),
        ("http://c:9464/metrics", None),
        ("http://d:9464/metrics", []),
        ("http://e:9464/metrics", [("wrapped", LiveLock(PTS_WRAP - 4_000)), ("old", LiveLock(5_000 + 900_001)),
                                   ("edge", LiveLock((5_000 - 900_000) % PTS_WRAP))]),
    ]  # fmt: skip
    assert peer_agreement(own, answers) == (
        PeerAgreement("backup", "agrees"),  # the same offset (another identity: the content is the same)
        PeerAgreement("spare", "differs", 18_000),  # 0.2 s later
        PeerAgreement("http://c:9464/metrics", "unreachable"),
        PeerAgreement("http://d:9464/metrics", "no_mapping"),
        PeerAgreement("wrapped", "differs", -9_000),  # across the wrap: 0.1 s earlier, not 2^33 - 9000 later
        PeerAgreement("old", "other_timeline", 900_001),  # one tick beyond the window
        PeerAgreement("edge", "differs", -900_000),  # on its edge
    )
    assert peer_agreement(own, []) == ()


def test_the_exported_live_content_offset_is_the_locks_source_time_not_a_constant():
    """The shell's path for a live source: each fragment exports (metric and /status) the lock's
    source time minus clock time, the number every group on the same mapping shares."""
    from types import SimpleNamespace

    from orchestrator.encode.ffmpeg import _Recut
    from orchestrator.encode.ffmpeg_command import plan_encodes, plan_instance
    from orchestrator.encode.recut import TrackRecutter
    from orchestrator.fmp4.boxes import Sample
    from orchestrator.ops.metrics import Metrics
    from orchestrator.ops.state import EncoderState
    from orchestrator.profile import parse_profile

    profile = parse_profile(SWEEP_PROFILE.format(rate="25", audio=""), "sweep.toml")
    encodes = plan_encodes(profile)
    start = plan_instance(encodes, T0_NS, live_index([encodes[0].clock], T0_NS))
    clock = encodes[0].clock
    sink = SimpleNamespace(states={"av": EncoderState("backup", "av")}, fragment=lambda f: None)
    metrics = Metrics()
    recutter = TrackRecutter(clock, anchor=start.anchors[0], first_index=start.first_index)
    output = _Recut(profile, encodes, [recutter], sink, group="backup", wall=SimpleNamespace(now_ns=lambda: T0_NS),
                    metrics=metrics)  # type: ignore[arg-type]  # fmt: skip
    lock = LiveLock(7_363_495_620, 1_796_000_000_123, "primary")
    output.header_seen, output.live_lock, output.lock_origin = True, lock, "peer"
    for _ in range(clock.first_frame(start.first_index) - start.anchors[0]):
        recutter.push(Sample(b"x", 1, False))
    samples = [Sample(b"x", 1, i == 0) for i in range(clock.frame_count(start.first_index))]
    output.fragment(SimpleNamespace(parsed=SimpleNamespace(trafs=[SimpleNamespace(track_id=1, samples=samples)])))
    exported = metrics.registry.get_sample_value("orchestrator_content_offset_seconds",
                                                 {"stream": "av", "group": "backup", "track": "video"})  # fmt: skip
    assert exported == ((-7_363_495_620) % PTS_WRAP) / 90000 == lock.content_offset_seconds()
    assert exported == 13627.09968888889  # the source 13,627 s ahead of the clock (mod 2^33 ticks)
    assert (sink.states["av"].lock, sink.states["av"].content_offset) == ("peer", exported)
