"""Content lock: which picture and which sound belong to shared-clock frame n.

Theory of operation
-------------------
The shared clock (:mod:`orchestrator.clock`) makes every group agree on the *index, start and
duration* of fragment k. This module makes them agree on its *content*: the source position
shown at shared frame n is a function of n alone, never of when or where an encoder started.

**File sources.** A file is played as if it had started at the epoch and looped ever since. Its
*loop length* L (exact, seconds) is what ffmpeg's own looping would use: the audio's length
when the file has audio (ffmpeg times consecutive passes by the decoded audio samples), else
its frame count divided by its (constant) frame rate. The source position of shared frame n of
a track with frame duration F is

    position(n) = (n * F) mod L

so for a file at the track's own rate, the picture at frame n is file frame ``n mod N``, and
the audio of AAC frame n starts at file sample ``(1024 * n) mod S``: sample-exact. An instance
that starts (or restarts) at anchor frame a opens the file at ``position(a)``
(:func:`file_entries`: an ffconcat list whose first entry has that in-point and whose next
entries are the whole file again, each starting exactly L later), so its m-th output frame is
shared frame a + m *and* shows position(a + m).

Why not ``-ss`` with ``-stream_loop``: ffmpeg 5.1 times its second pass from the packet the
seek landed on (the keyframe before the -ss point), so after the first loop the timeline
overlaps itself and the picture lands up to a GOP off (measured by decoding a frame-numbered
clip; see docs/content-lock.md). The concat demuxer's in-point and explicit durations are exact: durations are
written as differences of rounded absolute starts, so the microsecond rounding never accumulates.

A file *loops cleanly* (:func:`file_timing`) when its video has a constant frame rate and a
known frame count, it has the audio the profile needs, and its video and audio lengths differ
by at most one video frame (else the seam would freeze or skip pictures every pass).

**Test pattern.** Every pixel is a function of the shared frame: a still test card (one frame of
``testsrc2``, looped) with a box whose position is an expression of ``n + anchor``
(:func:`pattern_box_x`), a frame counter of the shared frame and the clock text; the tone is an
``aevalsrc`` expression of the shared sample number, with a 100 ms pip at the top of each
shared-clock second (:func:`tone_expression`). Cheaper than ``testsrc2`` redrawn per frame (see
docs/content-lock.md, "Test pattern cost").

**Observable.** :func:`content_offset_ns` is what the metric exports per fragment: the source
position of the fragment's first frame minus its shared-clock time, folded into the loop. Two
groups carry the same content exactly when it is equal for the same track. A live group states,
per peer, whether its mapping agrees with the peer's (:func:`peer_agreement`: agrees, differs
by N ticks, another timeline, unreachable, no mapping), from the reading :func:`converge` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from orchestrator.clock import NS_PER_SECOND, TrackClock
from orchestrator.errors import FileLockError
from orchestrator.ops.state import (
    PEER_AGREES,
    PEER_DIFFERS,
    PEER_NO_MAPPING,
    PEER_OTHER_TIMELINE,
    PEER_UNREACHABLE,
    PeerAgreement,
)

US_PER_SECOND = 1_000_000
PLAYLIST_SECONDS = 86400
"""How much looped content one ffconcat list covers; when it ends, ffmpeg exits and the restart
re-locks (each group at its own time, so the other group covers the seam)."""
MAX_PLAYLIST_ENTRIES = 20_000


@dataclass(frozen=True)
class FileTiming:
    """What the content lock needs to know about a file (from one ffprobe at planning time)."""

    loop: Fraction
    video_frames: int | None
    frame_rate: Fraction | None
    audio_samples: int | None
    sample_rate: int | None
    frame_positions: tuple[int, ...] = ()
    """Byte position in the file of each video frame's packet, in presentation order (ffprobe):
    how a picture ffmpeg delivered (``showinfo``'s ``pos``) is told apart from its neighbours."""


def _fraction(text: str) -> Fraction | None:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def file_timing(probe: dict[str, object], decoded_samples: int | None, *, needs_video: bool, needs_audio: bool
                ) -> FileTiming:  # fmt: skip
    """The file's loop timing from ``ffprobe -count_packets -show_streams -of json`` and the number
    of samples its first audio stream decodes to (what a pass really plays: the container's
    duration can be a few samples shorter than the decoder's output, measured 32 of 186368).

    Raises:
        FileLockError: the file lacks a stream the profile needs, has a variable frame rate or no
            frame count, or its audio and video lengths differ by more than a video frame.
    """
    streams = probe.get("streams")
    if not isinstance(streams, list):
        raise FileLockError("ffprobe found no streams")
    video = next((s for s in streams if isinstance(s, dict) and s.get("codec_type") == "video"), None)
    audio = next((s for s in streams if isinstance(s, dict) and s.get("codec_type") == "audio"), None)
    if needs_video and video is None:
        raise FileLockError("the file has no video stream, and the profile has video tracks")
    if needs_audio and audio is None:
        raise FileLockError("the file has no audio stream, and the profile has audio tracks")
    frames = rate = None
    video_length = None
    if video is not None:
        rate = _fraction(str(video.get("avg_frame_rate", "0/0")))
        real = _fraction(str(video.get("r_frame_rate", "0/0")))
        if rate is None or rate != real:
            raise FileLockError(f"the video frame rate is not constant (average {video.get('avg_frame_rate')}, "
                                f"real {video.get('r_frame_rate')}): it cannot be locked frame by frame")  # fmt: skip
        try:
            frames = int(str(video.get("nb_read_packets", video.get("nb_frames", ""))))
        except ValueError:
            frames = 0
        if frames <= 0:
            raise FileLockError("the video frame count is unknown")
        video_length = frames / rate
    sample_rate = None
    audio_length = None
    if audio is not None:
        try:
            sample_rate = int(str(audio.get("sample_rate", "")))
        except ValueError:
            raise FileLockError("the audio sample rate is unknown") from None
        if not decoded_samples or sample_rate <= 0:
            raise FileLockError("the audio stream is empty")
        audio_length = Fraction(decoded_samples, sample_rate)
    if (
        video_length is not None
        and audio_length is not None
        and rate is not None
        and abs(video_length - audio_length) > 1 / rate
    ):
        raise FileLockError(f"video ({float(video_length):.3f} s) and audio ({float(audio_length):.3f} s) "
                            "differ by more than one frame: the file cannot loop cleanly (trim it so both "
                            "streams have the same length)")  # fmt: skip
    loop = audio_length if audio_length is not None else video_length
    assert loop is not None
    return FileTiming(loop, frames, rate, decoded_samples if audio is not None else None, sample_rate)


def position(clock: TrackClock, frame: int, loop: Fraction) -> Fraction:
    """The file position (seconds, exact) that shared frame ``frame`` of ``clock`` shows."""
    return (frame * clock.frame_duration) % loop


def _us(seconds: Fraction) -> int:
    return round(seconds * US_PER_SECOND)


def _round_half_even(numerator: int, denominator: int) -> int:
    """``round(Fraction(numerator, denominator))`` (ties to even) for a positive denominator."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2):
        quotient += 1
    return quotient


def _seconds_text(us: int) -> str:
    return f"{us // US_PER_SECOND}.{us % US_PER_SECOND:06d}"


def file_entries(path: str, inpoint: Fraction, loop: Fraction) -> str:
    """The ffconcat list that plays ``path`` from ``inpoint`` and then loops it, each pass
    starting exactly ``loop`` seconds after the previous one (to the microsecond, no drift)."""
    quoted = "'" + path.replace("'", "'\\''") + "'"
    count = min(MAX_PLAYLIST_ENTRIES, int(PLAYLIST_SECONDS // loop) + 2)
    lines = ["ffconcat version 1.0"]
    previous = 0
    # end of entry i = round((i + 1) * L - inpoint) in us, in integers (a Fraction per entry cost
    # 0.3 s for a day of a 4 s clip): (i + 1) * a / b - c / d over the common denominator b * d.
    step_us, in_us = loop * US_PER_SECOND, inpoint * US_PER_SECOND
    a, b, c, d = step_us.numerator, step_us.denominator, in_us.numerator, in_us.denominator
    den = b * d
    for i in range(count):
        end = _round_half_even((i + 1) * a * d - c * b, den)
        lines.append(f"file {quoted}")
        if i == 0 and inpoint:
            lines.append(f"inpoint {_seconds_text(_us(inpoint))}")
        lines.append(f"duration {_seconds_text(end - previous)}")
        previous = end
    return "\n".join(lines) + "\n"


def content_offset_ns(clock: TrackClock, frame: int, loop: Fraction | None) -> int:
    """Source position minus shared-clock time of ``frame``, in ns, folded into ``[0, loop)``.

    Equal in every group that shows the same content at the same frame: 0 for the test pattern
    (``loop`` None: the content *is* the clock), the same value for a locked file. A live source
    exports its own mapping offset instead (see docs/content-lock.md)."""
    if loop is None:
        return 0
    t = frame * clock.frame_duration
    return round(((position(clock, frame, loop) - t) % loop) * NS_PER_SECOND)


def locked_frame(clock: TrackClock, frame: int, timing: FileTiming) -> int:
    """The file frame the lock shows at shared ``frame``: the one nearest ``position(frame)``
    (the ``fps`` filter's rounding: halves go up), where the next pass's frame 0 is at L, not at
    N / rate. They differ at a seam when the loop (the decoded audio) is longer than the video:
    a 60 s clip at 25 fps decodes to 60.0107 s of AAC, and a slot in the last 10.7 ms before
    L - F/2 shows the last frame again (measured: 1 picture of 10,650 in the issue-18 runs, at
    position 59.984 s, showed frame 1499 where the rounding alone says 0)."""
    assert timing.frame_rate is not None
    assert timing.video_frames is not None
    at = position(clock, frame, timing.loop)
    if at + 1 / (2 * timing.frame_rate) >= timing.loop:
        return 0  # within half a frame of the next pass
    return min(int(at * timing.frame_rate + Fraction(1, 2)), timing.video_frames - 1)


def measured_offset_frames(clock: TrackClock, frame: int, source_frame: int, timing: FileTiming) -> int:
    """How many file frames the picture ffmpeg delivered as shared ``frame`` (file frame
    ``source_frame``, as ffmpeg reported it) is after the one the lock puts there
    (:func:`locked_frame`), folded into ``[-N/2, N/2)``: 0 when the content is locked, in every
    group; a group whose restart landed a fragment off shows it (e.g. 50 at 25 fps, 2 s)."""
    assert timing.video_frames is not None
    count = timing.video_frames
    return (source_frame - locked_frame(clock, frame, timing) + count // 2) % count - count // 2


# --- test pattern ------------------------------------------------------------------------------

PATTERN_BOX_PERIOD = 120
"""Frames the moving box takes to cross the picture and come back."""


def pattern_box_x(anchor: int) -> str:
    """``overlay`` x expression: a box sweeping across, a function of the shared frame ``n + anchor``."""
    half = PATTERN_BOX_PERIOD // 2
    a = anchor % PATTERN_BOX_PERIOD
    return f"(main_w-overlay_w)*abs(mod(n+{a},{PATTERN_BOX_PERIOD})-{half})/{half}"


def tone_expression(first_sample: int, sample_rate: int, tone_hz: int) -> str:
    """``aevalsrc`` expression: a sine at ``tone_hz`` whose phase is a function of the shared
    sample number (``n + first_sample``), on for the first 100 ms of every shared-clock second.
    ``first_sample`` is the shared sample number of the instance's first sample."""
    s = first_sample % sample_rate  # the tone has a whole number of periods per second
    phase = f"mod(n+{s},{sample_rate})"
    return f"0.5*sin(2*PI*{tone_hz}*{phase}/{sample_rate})*lt({phase},{sample_rate // 10})"


# --- live sources ------------------------------------------------------------------------------

LIVE_TIMESCALE = 90000
"""MPEG-TS (and RTP video) timestamps: 90 kHz."""
PTS_WRAP = 1 << 33
"""MPEG-TS timestamps are 33 bits: they wrap every 26.5 hours."""
LOCK_TOLERANCE = 10 * LIVE_TIMESCALE
"""A mapping whose residual (mapped time of the newest source frame minus now) is larger than
this (10 s) belongs to another timeline: the source jumped or restarted."""


@dataclass(frozen=True)
class LiveLock:
    """The mapping of a live source's timestamps onto the shared clock (both in 90 kHz ticks):
    shared tick = source pts + ``offset``, with ``offset`` taken modulo 2^33 so that every
    group, whatever wrap it started in, exchanges the same number.

    Its identity travels with it: ``established_ms`` (the establishing group's wall clock, ms
    since the Unix epoch) and ``by`` (that group's name); a group that adopts a mapping keeps
    both, so every group ranks the same mappings the same way (:func:`agreed`)."""

    offset: int
    established_ms: int = 0
    by: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.offset < PTS_WRAP:
            raise ValueError("a live lock offset is taken modulo 2^33")

    def effective(self, pts: int, now_tick: int) -> tuple[int, int]:
        """The offset (+ k * 2^33, unwrapping) that maps ``pts`` nearest to ``now_tick``, and the
        residual: mapped time minus now. Within LOCK_TOLERANCE: the source is on this mapping."""
        base = pts + self.offset
        k = round(Fraction(now_tick - base, PTS_WRAP))
        effective = self.offset + k * PTS_WRAP
        return effective, pts + effective - now_tick

    def fits(self, pts: int, now_tick: int) -> bool:
        return abs(self.effective(pts, now_tick)[1]) <= LOCK_TOLERANCE

    @classmethod
    def establish(cls, pts: int, now_tick: int, *, established_ms: int = 0, by: str = "") -> LiveLock:
        """A new mapping that puts the source frame ``pts``, seen at ``now_tick``, at now."""
        return cls((now_tick - pts) % PTS_WRAP, established_ms, by)

    def same_timeline(self, other: LiveLock) -> bool:
        """Whether ``other`` maps the same source timeline (offsets within LOCK_TOLERANCE, modulo
        2^33): the same source seen by two groups whose mappings differ by skew or delay, rather
        than a mapping from before a discontinuity."""
        half = PTS_WRAP // 2
        return abs((self.offset - other.offset + half) % PTS_WRAP - half) <= LOCK_TOLERANCE

    def content_offset_seconds(self) -> float:
        """Source timestamp minus shared-clock time, folded into the 33-bit range: the same in
        every group on this mapping."""
        return ((-self.offset) % PTS_WRAP) / LIVE_TIMESCALE


def agreed(locks: Sequence[LiveLock]) -> LiveLock:
    """The mapping every group converges on among ``locks`` (all of one source timeline): the
    earliest established, ties broken by the establishing group's name, then the offset. Every
    group that sees the same mappings picks the same one, whoever started first."""
    return min(locks, key=lambda lock: (lock.established_ms, lock.by, lock.offset))


def choose_live_lock(pts: int, now_tick: int, peers: Sequence[LiveLock], saved: LiveLock | None, *,
                     now_ms: int = 0, group: str = "") -> tuple[LiveLock, str]:  # fmt: skip
    """The mapping an instance runs on, and where it came from (for the log and the metric).

    Among the peers' mappings and our own saved one, those that fit the source now, the
    :func:`agreed` one wins (``peer`` or ``saved``): a restarted or late group adopts what the
    running groups use. When none fits (the source jumped, restarted, or nothing is known) a new
    one is ``established``, stamped ``now_ms`` and ``group``; groups that establish at the same
    moment then converge while running (:func:`converge`)."""
    fitting = [lock for lock in peers if lock.fits(pts, now_tick)]
    if saved is not None and saved.fits(pts, now_tick):
        fitting.append(saved)
    if fitting:
        winner = agreed(fitting)
        return winner, "saved" if winner is saved else "peer"
    return LiveLock.establish(pts, now_tick, established_ms=now_ms, by=group), "established"


def converge(own: LiveLock, peers: Sequence[LiveLock]) -> LiveLock | None:
    """The mapping a running group must move to, or None when it runs the agreed one: the
    :func:`agreed` mapping among its own and the peers' on the same source timeline (a peer
    still on a timeline from before a discontinuity is ignored)."""
    winner = agreed([own, *(peer for peer in peers if own.same_timeline(peer))])
    return None if winner == own else winner


def peer_agreement(own: LiveLock, answers: Sequence[tuple[str, Sequence[tuple[str, LiveLock]] | None]]
                   ) -> tuple[PeerAgreement, ...]:  # fmt: skip
    """Whether ``own`` agrees with each peer, from one reading of the peers: ``answers`` holds,
    per configured peer (its URL), None when it did not answer, else the (group, mapping) pairs
    it exports for groups other than ours. One entry per peer group, in the order read; a peer
    that answered without a mapping is one ``no_mapping`` entry under its URL."""
    half = PTS_WRAP // 2
    found: list[PeerAgreement] = []
    for url, locks in answers:
        if locks is None:
            found.append(PeerAgreement(url, PEER_UNREACHABLE))
        elif not locks:
            found.append(PeerAgreement(url, PEER_NO_MAPPING))
        for name, lock in locks or ():
            ticks = (lock.offset - own.offset + half) % PTS_WRAP - half
            if ticks == 0:
                found.append(PeerAgreement(name, PEER_AGREES))
            else:
                state = PEER_DIFFERS if own.same_timeline(lock) else PEER_OTHER_TIMELINE
                found.append(PeerAgreement(name, state, ticks))
    return tuple(found)


def live_clock_shift(effective_offset: int) -> str:
    """``setpts``/``asetpts`` expression that turns source time into shared-clock time."""
    return f"PTS+{effective_offset}/{LIVE_TIMESCALE}/TB"
