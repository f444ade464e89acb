"""The shared clock: alignment across processes, frame-exact boundaries, no drift, exact values.

Expected values are computed here from first principles (``Fraction``, ``math.floor``/``ceil``),
never by calling the code under test.
"""

from __future__ import annotations

import datetime as dt
import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.clock import NS_PER_SECOND, TrackClock, fragment_due_ns, live_index
from orchestrator.profile import parse_profile

DEMO_TEXT = (Path(__file__).parent.parent / "profiles" / "demo.toml").read_text(encoding="utf-8")
DEMO_EPOCH_NS = 1_767_225_600 * NS_PER_SECOND  # 2026-01-01T00:00:00Z: 20454 days * 86400 s after 1970

VIDEO_RATES = [Fraction(30000, 1001), Fraction(24000, 1001), Fraction(25), Fraction(30), Fraction(50),
               Fraction(60000, 1001)]  # fmt: skip
VIDEO_TIMESCALES = [90000, 10_000_000]
AUDIO_RATES = [44100, 48000]
FRAGMENT_DURATIONS = [Fraction(2), Fraction(3), Fraction(4), Fraction(6), Fraction(5, 2), Fraction(1001, 500)]
YEARS_OF_FRAGMENTS = 10**8  # 10**8 fragments of 2 s is more than 6 years
EPOCHS_NS = st.integers(min_value=0, max_value=4_000_000_000 * NS_PER_SECOND)

BIG = settings(max_examples=200, deadline=None)


@st.composite
def media_clocks(draw: st.DrawFn) -> TrackClock:
    """Clocks as a profile makes them: video at a broadcast rate, or AAC (1024 samples a frame)."""
    epoch_ns = draw(EPOCHS_NS)
    fragment = draw(st.sampled_from(FRAGMENT_DURATIONS))
    if draw(st.booleans()):
        rate = draw(st.sampled_from(VIDEO_RATES))
        return TrackClock(epoch_ns, fragment, draw(st.sampled_from(VIDEO_TIMESCALES)), 1 / rate)
    sample_rate = draw(st.sampled_from(AUDIO_RATES))
    return TrackClock(epoch_ns, fragment, sample_rate, Fraction(1024, sample_rate))


@st.composite
def any_clocks(draw: st.DrawFn) -> TrackClock:
    """Any valid parameters, including fragment durations that are not a whole number of ticks
    (D * T fractional) and frames that are not (F * T fractional). At least one tick per frame."""
    timescale = draw(st.integers(min_value=1, max_value=10_000_000))
    frame = Fraction(draw(st.integers(1, 10_000)), draw(st.integers(1, 10_000)))
    frame = max(frame, Fraction(1, timescale))
    fragment = frame * Fraction(draw(st.integers(1, 3000)), draw(st.integers(1, 100)))
    fragment = max(fragment, frame)
    return TrackClock(draw(EPOCHS_NS), fragment, timescale, frame)


def nominal_tick(clock: TrackClock, k: int) -> Fraction:
    """k * D * T, exactly."""
    return k * clock.fragment_duration * clock.timescale


def ticks_per_frame(clock: TrackClock) -> Fraction:
    return clock.frame_duration * clock.timescale


# --- alignment -----------------------------------------------------------------------------------


def profile_text(*, epoch: str, fragment: str, frame_rate: str, video_timescale: int, sample_rate: int) -> str:
    text = DEMO_TEXT
    for old, new in [
        ("epoch = 2026-01-01T00:00:00Z", f"epoch = {epoch}"),
        ("fragment_duration = 2 ", f"fragment_duration = {fragment} "),
        ('frame_rate = "30000/1001"', f"frame_rate = {frame_rate}"),
        ("video_timescale = 90000", f"video_timescale = {video_timescale}"),
        ("sample_rate = 48000", f"sample_rate = {sample_rate}"),
    ]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


@settings(max_examples=60, deadline=None)
@given(
    seconds=st.integers(min_value=0, max_value=2**33),
    micros=st.integers(min_value=0, max_value=999_999),
    offset_hours=st.integers(min_value=-12, max_value=14),
    fragment=st.sampled_from(FRAGMENT_DURATIONS),
    rate=st.sampled_from(VIDEO_RATES),
    video_timescale=st.sampled_from(VIDEO_TIMESCALES),
    sample_rate=st.integers(min_value=8000, max_value=96000),
    k=st.integers(min_value=0, max_value=YEARS_OF_FRAGMENTS),
)
def test_clock_from_profile_text_equals_clock_built_directly(
    seconds: int,
    micros: int,
    offset_hours: int,
    fragment: Fraction,
    rate: Fraction,
    video_timescale: int,
    sample_rate: int,
    k: int,
) -> None:
    # The epoch written as local time at a UTC offset: the same instant, written differently.
    zone = dt.timezone(dt.timedelta(hours=offset_hours))
    local = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds, microseconds=micros)
    epoch_text = local.astimezone(zone).isoformat()
    text = profile_text(
        epoch=epoch_text,
        fragment=f'"{fragment.numerator}/{fragment.denominator}"',
        frame_rate=f'"{rate.numerator}/{rate.denominator}"',
        video_timescale=video_timescale,
        sample_rate=sample_rate,
    )
    epoch_ns = seconds * NS_PER_SECOND + micros * 1000
    profile = parse_profile(text, "generated.toml", now_ns=epoch_ns)  # an epoch up to now is runnable
    video, audio = profile.streams[0].tracks[0], profile.streams[1].tracks[0]
    pairs = [
        (profile.track_clock(video), TrackClock(epoch_ns, fragment, video_timescale, 1 / rate)),
        (profile.track_clock(audio), TrackClock(epoch_ns, fragment, sample_rate, Fraction(1024, sample_rate))),
    ]
    for parsed, direct in pairs:
        assert parsed == direct
        assert parsed.start(k) == direct.start(k)
        assert parsed.duration(k) == direct.duration(k)
        assert parsed.sample_durations(k) == direct.sample_durations(k)
        now_ns = direct.wall_ns(direct.start(k)) + 12345
        assert parsed.index_at(now_ns) == direct.index_at(now_ns) == k


@BIG
@given(
    clock=media_clocks(),
    first_start_ns=st.integers(min_value=0, max_value=10**18),
    later_by_ns=st.integers(min_value=0, max_value=10**17),
)
def test_a_process_started_later_computes_the_same_fragments(
    clock: TrackClock, first_start_ns: int, later_by_ns: int
) -> None:
    early = TrackClock(clock.epoch_ns, clock.fragment_duration, clock.timescale, clock.frame_duration)
    k_early = early.index_at(first_start_ns)
    seen = {k: (early.start(k), early.duration(k), early.sample_durations(k)) for k in range(k_early, k_early + 3)}
    # Much later, another process on another host, asking in a different order, after other work.
    late = TrackClock(clock.epoch_ns, clock.fragment_duration, clock.timescale, clock.frame_duration)
    k_late = late.index_at(first_start_ns + later_by_ns)
    assert k_late >= k_early
    late.start(k_late + 1000)
    for k in sorted(seen, reverse=True):
        assert (late.start(k), late.duration(k), late.sample_durations(k)) == seen[k]
    # ... and the early process, still running, agrees on the later process's fragments too.
    assert early.start(k_late) == late.start(k_late)
    assert early.index_at(first_start_ns) == k_early


# --- boundaries and drift -------------------------------------------------------------------------


@BIG
@given(clock=any_clocks(), k=st.integers(min_value=-(10**9), max_value=10**9))
def test_fragment_starts_on_the_first_frame_at_or_after_the_nominal_boundary(clock: TrackClock, k: int) -> None:
    n = math.ceil(k * clock.fragment_duration / clock.frame_duration)
    assert (n - 1) * clock.frame_duration < k * clock.fragment_duration <= n * clock.frame_duration
    assert clock.first_frame(k) == n
    assert clock.start(k) == math.floor(n * ticks_per_frame(clock)) == clock.frame_time(n)


@pytest.mark.parametrize("timescale", VIDEO_TIMESCALES)
@pytest.mark.parametrize("rate", VIDEO_RATES, ids=str)
@settings(max_examples=100, deadline=None)
@given(k=st.integers(min_value=0, max_value=YEARS_OF_FRAGMENTS), fragment=st.sampled_from(FRAGMENT_DURATIONS))
def test_video_boundaries_do_not_drift(rate: Fraction, timescale: int, k: int, fragment: Fraction) -> None:
    clock = TrackClock(DEMO_EPOCH_NS, fragment, timescale, 1 / rate)
    drift = clock.start(k) - nominal_tick(clock, k)
    assert 0 <= drift < math.ceil(ticks_per_frame(clock))


@pytest.mark.parametrize("sample_rate", AUDIO_RATES)
@settings(max_examples=100, deadline=None)
@given(k=st.integers(min_value=0, max_value=YEARS_OF_FRAGMENTS), fragment=st.sampled_from(FRAGMENT_DURATIONS))
def test_aac_boundaries_do_not_drift(sample_rate: int, k: int, fragment: Fraction) -> None:
    clock = TrackClock(DEMO_EPOCH_NS, fragment, sample_rate, Fraction(1024, sample_rate))
    drift = clock.start(k) - nominal_tick(clock, k)
    assert 0 <= drift < 1024


@pytest.mark.parametrize("k", [0, 1, 10**6, YEARS_OF_FRAGMENTS, 10**12])
def test_no_drift_at_fixed_far_indices(k: int) -> None:
    for clock in [
        TrackClock(0, Fraction(2), 90000, Fraction(1001, 30000)),
        TrackClock(0, Fraction(2), 10_000_000, Fraction(1001, 24000)),
        TrackClock(0, Fraction(2), 44100, Fraction(1024, 44100)),
    ]:
        assert 0 <= clock.start(k) - nominal_tick(clock, k) < math.ceil(ticks_per_frame(clock))


@BIG
@given(clock=any_clocks(), k=st.integers(min_value=-(10**9), max_value=10**9))
def test_drift_bound_for_any_parameters(clock: TrackClock, k: int) -> None:
    # In general start(k) = floor(n * F * T) with n * F * T >= k * D * T, so when k * D * T is
    # not a whole tick the start may sit a fraction of a tick *before* it (never a whole tick).
    drift = clock.start(k) - nominal_tick(clock, k)
    assert -1 < drift < ticks_per_frame(clock)
    if nominal_tick(clock, k).denominator == 1:
        assert drift >= 0


# --- per-fragment frames and durations -----------------------------------------------------------


@BIG
@given(clock=any_clocks(), k=st.integers(min_value=-(10**9), max_value=10**9))
def test_frame_counts_and_durations(clock: TrackClock, k: int) -> None:
    per_fragment = clock.fragment_duration / clock.frame_duration
    counts = {clock.frame_count(j) for j in range(k, k + 8)}
    assert counts <= {math.floor(per_fragment), math.ceil(per_fragment)}
    for j in range(k, k + 8):
        # A fragment lasts its frames' worth of ticks, give or take the rounding of one tick.
        assert abs(clock.duration(j) - clock.frame_count(j) * ticks_per_frame(clock)) < 1
    durations = [clock.duration(j) for j in range(k, k + 8)]
    assert max(durations) - min(durations) <= math.ceil(ticks_per_frame(clock)) + 1
    if ticks_per_frame(clock).denominator == 1:  # whole ticks per frame: exactly one frame apart
        assert max(durations) - min(durations) in {0, ticks_per_frame(clock)}


@settings(max_examples=100, deadline=None)
@given(clock=st.one_of(media_clocks(), any_clocks()), k=st.integers(min_value=0, max_value=YEARS_OF_FRAGMENTS))
def test_sample_durations_add_up_and_are_floor_or_ceil_of_a_frame(clock: TrackClock, k: int) -> None:
    samples = clock.sample_durations(k)
    assert len(samples) == clock.frame_count(k)
    assert sum(samples) == clock.duration(k)
    per_frame = ticks_per_frame(clock)
    assert set(samples) <= {math.floor(per_frame), math.ceil(per_frame)}


# --- from ticks and wall-clock instants back to fragments ---------------------------------------


@BIG
@given(clock=any_clocks(), k=st.integers(min_value=-(10**9), max_value=10**9))
def test_index_of_tick_at_fragment_edges(clock: TrackClock, k: int) -> None:
    assert clock.index_of_tick(clock.start(k)) == k
    assert clock.index_of_tick(clock.start(k + 1) - 1) == k


@BIG
@given(clock=any_clocks(), tick=st.integers(min_value=-(10**15), max_value=10**15))
def test_index_of_any_tick(clock: TrackClock, tick: int) -> None:
    k = clock.index_of_tick(tick)
    assert clock.start(k) <= tick < clock.start(k + 1)


def test_index_of_tick_when_a_start_falls_a_fraction_of_a_tick_before_the_nominal_boundary() -> None:
    # D = 5/2 s, T = 1 tick/s, F = 1/3 s. Fragment 1 starts at frame ceil(2.5 * 3) = 8, i.e. at
    # 8/3 s = tick floor(2.67) = 2, which is before the nominal boundary 2.5. A guess that only
    # looks backwards from floor(2 / 2.5) = 0 would answer 0. Fragment 0 is ticks [0, 2).
    clock = TrackClock(0, Fraction(5, 2), 1, Fraction(1, 3))
    assert clock.start(1) == 2
    assert clock.index_of_tick(1) == 0
    assert clock.index_of_tick(2) == 1


@BIG
@given(clock=media_clocks(), k=st.integers(min_value=0, max_value=YEARS_OF_FRAGMENTS))
def test_wall_clock_round_trip(clock: TrackClock, k: int) -> None:
    first_live_ns = clock.wall_ns(clock.start(k))
    assert clock.index_at(first_live_ns) == k
    assert clock.index_at(first_live_ns - 1) == k - 1  # fragment k is live from that very nanosecond
    exact_end = clock.epoch_ns + Fraction(clock.start(k + 1) * NS_PER_SECOND, clock.timescale)
    assert 0 <= clock.end_ns(k) - exact_end < 1
    assert clock.index_at(clock.end_ns(k)) == k + 1
    assert clock.index_at(clock.end_ns(k) - 1) == k


@BIG
@given(
    epoch_ns=EPOCHS_NS,
    fragment=st.sampled_from(FRAGMENT_DURATIONS),
    video=st.lists(st.tuples(st.sampled_from(VIDEO_RATES), st.sampled_from(VIDEO_TIMESCALES)), max_size=3),
    audio=st.lists(st.sampled_from(AUDIO_RATES), max_size=2),
    k=st.integers(min_value=0, max_value=YEARS_OF_FRAGMENTS),
)
def test_fragment_due_and_live_index_over_several_tracks(
    epoch_ns: int,
    fragment: Fraction,
    video: list[tuple[Fraction, int]],
    audio: list[int],
    k: int,
) -> None:
    clocks = [TrackClock(epoch_ns, fragment, ts, 1 / rate) for rate, ts in video]
    clocks += [TrackClock(epoch_ns, fragment, sr, Fraction(1024, sr)) for sr in audio]
    if not clocks:
        clocks = [TrackClock(epoch_ns, fragment, 90000, Fraction(1, 25))]
    due = fragment_due_ns(clocks, k)
    # Due when the last track has captured it: every track's fragment k is over, one was not 1 ns before.
    assert all(c.index_at(due) >= k + 1 for c in clocks)
    assert any(c.index_at(due - 1) == k for c in clocks)
    assert live_index(clocks, due) == k + 1
    assert live_index(clocks, due - 1) == k
    # The slowest track decides.
    assert live_index(clocks, due) == min(c.index_at(due) for c in clocks)


# --- exact values worked out by hand ----------------------------------------------------------------


def demo_clocks() -> tuple[TrackClock, TrackClock]:
    profile = parse_profile(DEMO_TEXT, "demo.toml")
    return (
        profile.track_clock(profile.streams[0].tracks[0]),
        profile.track_clock(profile.streams[1].tracks[0]),
    )


def test_demo_video_exact_fragment_durations() -> None:
    # 29.97 fps at 90 kHz: one frame is 90000 * 1001/30000 = 3003 ticks exactly. A 2 s fragment is
    # 2 * 30000/1001 = 59.94 frames, so fragment k starts at frame ceil(k * 60000/1001)
    # = 60k - floor(60k/1001) and holds 60 frames (180180 ticks) except when floor(60k/1001) steps
    # up between k and k+1, where it holds 59 (177177 ticks): 60(k+1) >= 1001 m first for
    # k = 16 (m=1: 1020 >= 1001), 33 (m=2: 2040 >= 2002), 50 (m=3: 3060 >= 3003), 66, 83, 100, 116 ...
    video, _ = demo_clocks()
    assert video.epoch_ns == DEMO_EPOCH_NS
    assert [video.duration(k) for k in range(10)] == [180180] * 10
    assert [video.duration(k) for k in range(10, 20)] == [180180] * 6 + [177177] + [180180] * 3
    assert [k for k in range(120) if video.duration(k) == 177177] == [16, 33, 50, 66, 83, 100, 116]
    assert [video.frame_count(k) for k in (15, 16, 17)] == [60, 59, 60]
    assert video.start(16) == 960 * 3003  # frame 960 - floor(960/1001) = 960
    assert video.start(17) == 1019 * 3003  # frame 1020 - floor(1020/1001) = 1019
    assert video.sample_durations(16) == [3003] * 59
    # 1001 fragments (2002 s) hold exactly 60000 frames: the pattern repeats with no residue.
    assert video.start(1001) == 60000 * 3003 == 2002 * 90000
    # Fragment 10**8: frame 6 * 10**9 - floor(6 * 10**9 / 1001) = 6 * 10**9 - 5994005.
    assert video.start(10**8) == (6 * 10**9 - 5_994_005) * 3003


def test_demo_audio_exact_fragment_durations() -> None:
    # AAC at 48 kHz: 1024 ticks a frame; 2 s is 96000/1024 = 93.75 frames, so fragment starts are
    # frames ceil(93.75 k) = 0, 94, 188, 282, 375, ...: 94, 94, 94, 93 frames, every 4 fragments.
    _, audio = demo_clocks()
    assert [audio.duration(k) for k in range(8)] == [94 * 1024, 94 * 1024, 94 * 1024, 93 * 1024] * 2
    assert [audio.start(k) for k in range(5)] == [0, 94 * 1024, 188 * 1024, 282 * 1024, 375 * 1024]
    assert audio.start(4) == 8 * 48000


def test_aac_44100_exact_fragment_starts() -> None:
    # 2 s at 44.1 kHz is 88200/1024 = 86.1328125 frames: starts at frames ceil(86.1328125 k).
    clock = TrackClock(0, Fraction(2), 44100, Fraction(1024, 44100))
    assert [clock.first_frame(k) for k in range(5)] == [0, 87, 173, 259, 345]
    assert [clock.duration(k) for k in range(4)] == [87 * 1024, 86 * 1024, 86 * 1024, 86 * 1024]
    # 128 fragments (256 s) are 11025 frames exactly.
    assert clock.start(128) == 11025 * 1024 == 256 * 44100


def test_23976_fps_sample_durations_alternate() -> None:
    # 24000/1001 fps at 90 kHz: 3753.75 ticks a frame; frames start at floor(3753.75 n)
    # = 0, 3753, 7507, 11261, 15015, so durations run 3753, 3754, 3754, 3754 and repeat.
    clock = TrackClock(0, Fraction(2), 90000, Fraction(1001, 24000))
    samples = clock.sample_durations(0)
    assert samples[:8] == [3753, 3754, 3754, 3754] * 2
    # 2 s is 47.952 frames: fragment 0 holds 48, ending at floor(48 * 3753.75) = 180180.
    assert len(samples) == 48
    assert clock.start(1) == 180180


def test_demo_wall_clock_exact() -> None:
    video, audio = demo_clocks()
    # Video fragment 0 ends at tick 180180 = 2.002 s; audio at 96256 / 48000 s = 2.00533... s,
    # i.e. 2005333333.33 ns, rounded up.
    assert video.end_ns(0) == DEMO_EPOCH_NS + 2_002_000_000
    assert audio.end_ns(0) == DEMO_EPOCH_NS + 2_005_333_334
    assert fragment_due_ns([video, audio], 0) == DEMO_EPOCH_NS + 2_005_333_334
    assert live_index([video, audio], DEMO_EPOCH_NS + 2_005_333_333) == 0
    assert live_index([video, audio], DEMO_EPOCH_NS + 2_005_333_334) == 1
    # Before the epoch, fragments count backwards: one second early is fragment -1.
    assert video.index_at(DEMO_EPOCH_NS - NS_PER_SECOND) == -1
    assert video.tick_at(DEMO_EPOCH_NS - 1) == -1  # floor, not truncation


@pytest.mark.parametrize(
    ("fragment", "timescale", "frame"),
    [(Fraction(0), 90000, Fraction(1, 25)), (Fraction(2), 0, Fraction(1, 25)), (Fraction(2), 90000, Fraction(0)),
     (Fraction(2), 90000, Fraction(3))],
)  # fmt: skip
def test_invalid_clock_parameters(fragment: Fraction, timescale: int, frame: Fraction) -> None:
    with pytest.raises(ValueError, match=r"positive|longer than a fragment"):
        TrackClock(0, fragment, timescale, frame)


# --- the duration period (what the synthetic encoder's fragment templates are keyed on) -------------


@pytest.mark.parametrize(
    ("clock", "period"),
    [
        (TrackClock(0, Fraction(2), 90000, Fraction(1001, 30000)), 1),  # 3003 ticks, every frame
        (TrackClock(0, Fraction(2), 90000, Fraction(1, 25)), 1),  # 3600
        (TrackClock(0, Fraction(2), 44100, Fraction(1024, 44100)), 1),  # 1024
        (TrackClock(0, Fraction(2), 90000, Fraction(1001, 24000)), 4),  # 3753.75: 3753, 3754, 3754, 3754
        (TrackClock(0, Fraction(2), 10_000_000, Fraction(1001, 24000)), 3),  # 417083 1/3
        (TrackClock(0, Fraction(5, 2), 1, Fraction(1, 3)), 3),  # a third of a tick: 0, 0, 1
    ],
)
def test_duration_period_of_broadcast_clocks(clock: TrackClock, period: int) -> None:
    assert clock.duration_period() == period
    # From first principles: the smallest p with p * F * T a whole number of ticks.
    assert period == (clock.frame_duration * clock.timescale).denominator


@BIG
@given(clock=any_clocks(), n=st.integers(min_value=-(10**9), max_value=10**9))
def test_frame_durations_repeat_with_the_duration_period(clock: TrackClock, n: int) -> None:
    p = clock.duration_period()
    exact = clock.frame_duration * clock.timescale
    assert p == exact.denominator  # the smallest p with p * F * T a whole number of ticks
    assert clock.frame_time(n + p) - clock.frame_time(n) == p * exact
    assert clock.frame_time(n) == math.floor(n * exact)
    assert clock.first_frame(n) == math.ceil(n * clock.fragment_duration / clock.frame_duration)
