"""Re-cutting an encoder's output onto the shared clock.

Theory of operation
-------------------
An encoder process (ffmpeg) knows nothing of the shared clock: it starts its timeline at zero,
its AAC encoder prepends priming samples, and it cuts fragments where it likes. We keep only
what it is good at, the encoded access units, and throw its timing away.

When an instance starts, at wall-clock instant ``now``, each track gets an *anchor*: the number
of the first shared-clock frame at or after ``now`` (:func:`anchor_frame`). The encoder is paced
in real time (``-re`` or a live input) and emits exactly one access unit per frame period
(constant frame rate for video; AAC is 1024 samples per frame by construction), so its m-th
content sample *is* shared frame ``anchor + m``: it takes that frame's duration from the clock,
and it lands in the fragment whose span holds that frame. Priming samples (the AAC encoder's
delay, counted in whole frames) are dropped first, so audio is neither shifted nor negative.

A :class:`TrackRecutter` collects the samples of one encoded track and returns a :class:`Cut`
(index, start tick, re-stamped samples) each time a fragment is complete. Nothing before the
instance's first whole fragment is emitted: :func:`start_index` is the first fragment, common to
all tracks, whose first frame is at or after every track's anchor (and not before the index the
supervisor asked for). The encoder is told to force a keyframe on every fragment's first frame
(:func:`keyframe_boundary`); a cut records whether it does start with one, and the shell rejects
one that does not, since a player cannot join or switch there.

Why by hand: this mapping is the product's reason to exist (every group, on every host, emits
the same index, start and duration for the same frames); no library does it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from orchestrator.clock import TrackClock
from orchestrator.fmp4 import boxes


def anchor_frame(clock: TrackClock, now_ns: int) -> int:
    """The first frame of ``clock`` that starts at or after the media tick of wall-clock ``now_ns``."""
    tick = clock.tick_at(now_ns)
    f = clock.frame_duration
    # frame_time(n) = floor(n*F*T) >= tick  <=>  n*F*T >= tick (tick is an integer)
    return -((-tick * f.denominator) // (f.numerator * clock.timescale))


def first_fragment_from(clock: TrackClock, frame: int) -> int:
    """The lowest fragment index k whose first frame is at or after ``frame``."""
    # first_frame(k) = ceil(k*D/F) >= frame  <=>  k*D/F > frame - 1  <=>  k > (frame-1)*F/D
    ratio = clock.frame_duration / clock.fragment_duration
    return ((frame - 1) * ratio.numerator) // ratio.denominator + 1


def start_index(clocks: Sequence[TrackClock], anchors: Sequence[int], requested: int) -> int:
    """The first fragment every track can fill from its first frame, and not below ``requested``."""
    return max([requested, *(first_fragment_from(c, a) for c, a in zip(clocks, anchors, strict=True))])


def keyframe_boundary(clock: TrackClock) -> Fraction:
    """F/D, the ratio that decides whether frame N opens a fragment.

    Frame N is the first of some fragment iff ``floor(N*F/D) > floor((N-1)*F/D)``: there is an
    integer k with ``(N-1) < k*D/F <= N``. The ffmpeg expression is built from this ratio.
    """
    return clock.frame_duration / clock.fragment_duration


def opens_fragment(clock: TrackClock, frame: int) -> bool:
    ratio = keyframe_boundary(clock)
    p, q = ratio.numerator, ratio.denominator
    return (frame * p) // q > ((frame - 1) * p) // q


@dataclass(frozen=True)
class Cut:
    """Fragment ``index`` of one encoded track, re-stamped onto the shared clock."""

    index: int
    start: int
    samples: tuple[boxes.Sample, ...]
    starts_with_keyframe: bool

    @property
    def duration(self) -> int:
        return sum(s.duration for s in self.samples)


class TrackRecutter:
    """Maps one encoded track's samples, in decode order, onto its shared clock."""

    def __init__(self, clock: TrackClock, *, anchor: int, first_index: int, priming_frames: int = 0) -> None:
        if clock.first_frame(first_index) < anchor:
            raise ValueError(f"fragment {first_index} starts before the anchor frame {anchor}")
        self.clock = clock
        self.index = first_index
        self._next_frame = anchor
        self._to_drop = priming_frames
        self._fragment_first = clock.first_frame(first_index)
        self._fragment_end = clock.first_frame(first_index + 1)
        self._samples: list[boxes.Sample] = []
        self.discarded = 0

    @property
    def next_frame(self) -> int:
        """The shared frame number the next content sample will be."""
        return self._next_frame

    def push(self, sample: boxes.Sample) -> Cut | None:
        """Take the encoder's next sample; returns the fragment it completes, if any."""
        if self._to_drop:
            self._to_drop -= 1
            self.discarded += 1
            return None
        n = self._next_frame
        self._next_frame += 1
        if n < self._fragment_first:
            self.discarded += 1  # before the instance's first whole fragment
            return None
        duration = self.clock.frame_time(n + 1) - self.clock.frame_time(n)
        # Composition offsets are dropped: the encoder is run without B-frames, so presentation
        # order is decode order and every offset is zero.
        self._samples.append(boxes.Sample(sample.data, duration, sample.is_sync))
        if n + 1 < self._fragment_end:
            return None
        cut = Cut(self.index, self.clock.start(self.index), tuple(self._samples), self._samples[0].is_sync)
        self._samples = []
        self.index += 1
        self._fragment_first = self._fragment_end
        self._fragment_end = self.clock.first_frame(self.index + 1)
        return cut
