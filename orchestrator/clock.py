"""The shared clock: where fragment k of a track starts, how long it lasts, and when it is due.

Theory of operation
-------------------
Every encoder in every group, on every host, is given the same three facts by the profile: an
*epoch* (a UTC instant), a nominal *fragment duration* D (an exact rational number of seconds)
and, per track, a *timescale* T (ticks per second) and a *frame duration* F (an exact rational
number of seconds: 1001/30000 for 29.97 fps video, 1024/48000 for AAC at 48 kHz). Nothing else is
shared and nothing is exchanged at run time.

Media time is counted in ticks since the epoch. Frame n of a track starts at tick

    frame_time(n) = floor(n * F * T)

and fragment k starts with the first frame at or after the nominal boundary k * D:

    first_frame(k) = ceil(k * D / F)
    start(k)       = frame_time(first_frame(k))
    duration(k)    = start(k + 1) - start(k)

Both are closed-form functions of k, computed with integers only, so there is no accumulated
error: after a year of 2-second fragments the boundary is still within one frame of k * D, and a
process that starts late, restarts, or runs on another host computes the very same numbers for
the very same k. Where D is not a whole number of frames (2 s of 29.97 fps video is 59.94
frames), consecutive fragments differ by exactly one frame, in a repeating pattern.

Wall-clock time enters only as an integer count of nanoseconds since the Unix epoch (``now_ns``),
passed in by the caller; this module never reads a clock itself.

Everything here is arithmetic on the clock, never a statement that fragment k exists: a sparse
track (:data:`orchestrator.tracks.SPARSE`, ``continuous=False``) shares the same fragment
boundaries but has a fragment only for some k. So :func:`fragment_due_ns` says when fragment k
*would* be complete, and a caller that waits for fragments must wait only for those of
continuous tracks (:class:`orchestrator.encode.continuity.Continuity` does).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction

NS_PER_SECOND = 1_000_000_000


def _floor_div(numerator: int, denominator: int) -> int:
    return numerator // denominator


def _ceil_div(numerator: int, denominator: int) -> int:
    return -((-numerator) // denominator)


@dataclass(frozen=True)
class TrackClock:
    """The shared clock of one track.

    Attributes:
        epoch_ns: the presentation epoch, in nanoseconds since the Unix epoch.
        fragment_duration: nominal fragment duration D, in seconds (exact).
        timescale: ticks per second of the track (90000 for video, the sample rate for audio).
        frame_duration: duration of one frame F, in seconds (exact).
    """

    epoch_ns: int
    fragment_duration: Fraction
    timescale: int
    frame_duration: Fraction
    # The integers of the two formulas above, worked out once: frame_time(n) = n * _tick_num //
    # _tick_den and first_frame(k) = ceil(k * _frame_num / _frame_den). Every fragment of every
    # stream asks for them several times, and a Fraction's numerator is a Python property.
    _tick_num: int = field(init=False, repr=False, compare=False)
    _tick_den: int = field(init=False, repr=False, compare=False)
    _frame_num: int = field(init=False, repr=False, compare=False)
    _frame_den: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fragment_duration <= 0 or self.frame_duration <= 0 or self.timescale <= 0:
            raise ValueError("fragment duration, frame duration and timescale must be positive")
        if self.frame_duration > self.fragment_duration:
            raise ValueError("a frame cannot be longer than a fragment")
        d, f = self.fragment_duration, self.frame_duration
        object.__setattr__(self, "_tick_num", f.numerator * self.timescale)
        object.__setattr__(self, "_tick_den", f.denominator)
        object.__setattr__(self, "_frame_num", d.numerator * f.denominator)
        object.__setattr__(self, "_frame_den", d.denominator * f.numerator)

    # --- frames ---------------------------------------------------------------------------

    def frame_time(self, n: int) -> int:
        """Tick at which frame n starts (frame 0 starts at the epoch): floor(n * F * T)."""
        return (n * self._tick_num) // self._tick_den

    def first_frame(self, k: int) -> int:
        """Number of the first frame of fragment k: the first frame at or after k * D: ceil(k * D / F)."""
        return -((-k * self._frame_num) // self._frame_den)

    def duration_period(self) -> int:
        """The frame durations repeat every this many frames: frame_time(n + p) = frame_time(n) +
        frame_time(p) for p = duration_period(), so the duration of frame n depends on n mod p only
        (1 when F * T is a whole number of ticks, as for 29.97 fps at 90 kHz or AAC at its rate)."""
        return self._tick_den // math.gcd(self._tick_num, self._tick_den)

    def frame_count(self, k: int) -> int:
        """How many frames fragment k holds."""
        return self.first_frame(k + 1) - self.first_frame(k)

    def sample_durations(self, k: int) -> list[int]:
        """Duration in ticks of each frame of fragment k; they add up to ``duration(k)``."""
        first = self.first_frame(k)
        times = [self.frame_time(n) for n in range(first, self.first_frame(k + 1) + 1)]
        return [b - a for a, b in itertools.pairwise(times)]

    # --- fragments ------------------------------------------------------------------------

    def start(self, k: int) -> int:
        """Tick at which fragment k starts (its tfdt / tfxd absolute time)."""
        return self.frame_time(self.first_frame(k))

    def duration(self, k: int) -> int:
        """Duration of fragment k in ticks (its tfxd duration)."""
        return self.start(k + 1) - self.start(k)

    def index_of_tick(self, tick: int) -> int:
        """The fragment whose span ``[start(k), start(k+1))`` contains ``tick``."""
        d = self.fragment_duration
        # Nominal guess floor(tick / (D*T)). start(k) lies less than one frame after k*D*T, but
        # when D*T is not a whole number of ticks the floor in frame_time can also put it a
        # fraction of a tick *before* k*D*T, so correct the guess in both directions.
        guess = _floor_div(tick * d.denominator, d.numerator * self.timescale)
        while self.start(guess) > tick:
            guess -= 1
        while self.start(guess + 1) <= tick:
            guess += 1
        return guess

    # --- wall clock -----------------------------------------------------------------------

    def tick_at(self, now_ns: int) -> int:
        """The media tick that corresponds to wall-clock ``now_ns`` (floor)."""
        return _floor_div((now_ns - self.epoch_ns) * self.timescale, NS_PER_SECOND)

    def index_at(self, now_ns: int) -> int:
        """The fragment that is live (being captured) at wall-clock ``now_ns``."""
        return self.index_of_tick(self.tick_at(now_ns))

    def wall_ns(self, tick: int) -> int:
        """The wall-clock instant (ns, rounded up) at which media tick ``tick`` is reached."""
        return self.epoch_ns + _ceil_div(tick * NS_PER_SECOND, self.timescale)

    def end_ns(self, k: int) -> int:
        """The wall-clock instant at which fragment k has been fully captured."""
        return self.wall_ns(self.start(k + 1))


def fragment_due_ns(clocks: list[TrackClock], k: int) -> int:
    """When fragment k of a stream is complete on every one of its tracks (that has one: a
    sparse track may have none, and no one should wait for it)."""
    return max(clock.end_ns(k) for clock in clocks)


def live_index(clocks: list[TrackClock], now_ns: int) -> int:
    """The lowest fragment index that some track of the stream is still capturing at ``now_ns``."""
    return min(clock.index_at(now_ns) for clock in clocks)
