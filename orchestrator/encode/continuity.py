"""Continuity of one encoder group's timeline across encoder restarts and process restarts.

Theory of operation
-------------------
The shared clock (:mod:`orchestrator.clock`) says what fragment k of every track is: its start
time and its duration. What it cannot say is which fragments this group has already emitted.
:class:`Continuity` remembers that, per stream and track, and is the single gate every fragment
of every encoder instance of the group passes through on its way to the publishers:

* a fragment whose (start, duration, timescale) is not the shared clock's for its index is
  **rejected** (``off_clock``): an encoder must never be able to put an index on the wire with
  another timestamp;
* a fragment whose index was already emitted for its track is a **repeat** (``repeat``): a
  restarted instance may re-encode the fragment its predecessor finished; the first copy stands;
* anything else is accepted, and indices, hence timestamps, only ever increase. A jump forward
  (the instance was down for a while) is accepted and reported as ``skipped`` fragments: the
  other group covers them at a de-duplicating receiver.

:meth:`Continuity.first_index` is where a new instance starts: the fragment live on the wall
clock, or the one after the last fragment the group emitted, whichever is later. If the wall
clock has stepped backwards so that the live fragment was already emitted, the supervisor waits
until the clock reaches :meth:`Continuity.resume_floor` rather than reissue an index.

The state that must survive a process or pod restart is the last index emitted per track
(:meth:`Continuity.snapshot`); the shell writes it *before* the fragments it covers reach any
publisher, so a restarted process never sends again an index it already sent.
:func:`encode_state` and :func:`decode_state` turn it into JSON bytes and back, together with
the facts that give those integers their meaning (presentation name, epoch, fragment duration);
a state file from another presentation or another clock is refused, not misread. Writing the
file atomically is the shell's job (:mod:`orchestrator.encode.statefile`).

Only *continuous* tracks (video, audio: a fragment for every index k; :mod:`orchestrator.tracks`)
decide how far a stream has got: :meth:`completed` is the least advanced continuous track, so a
sparse track, which has a fragment only now and then, never holds a stream back (a resume, a
graceful stop, the state file). A stream of sparse tracks only has completed its most advanced
one. A sparse track skips indices as a matter of course: its ``skipped`` is always 0.

Every fragment of every stream passes here, so the per-fragment questions cost the same at 1,000
streams as at one: the index each stream has completed on all its tracks (:meth:`completed`) is
kept up to date as fragments are accepted, and so is the set of streams still short of the index
a graceful stop waits for (:meth:`watch_final`, :attr:`final_reached`), instead of scanning the
tracks or the streams for every fragment.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from orchestrator.clock import TrackClock
from orchestrator.errors import StateMismatch
from orchestrator.fmp4.stream import EncodedFragment
from orchestrator.tracks import TrackKind

STATE_FORMAT = 1


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    REPEAT = "repeat"  # index already emitted on this track: dropped, harmless
    OFF_CLOCK = "off_clock"  # time or duration disagrees with the shared clock: dropped, an encoder bug
    UNKNOWN_TRACK = "unknown_track"


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""
    skipped: int = 0  # fragments of this track never emitted between the previous one and this one


class Continuity:
    """Per encoder group: the last fragment index emitted on every track of every stream."""

    def __init__(
        self,
        clocks: Mapping[str, Sequence[TrackClock]],
        restored: Mapping[str, Sequence[int]] | None = None,
        track_ids: Mapping[str, Sequence[int]] | None = None,
        kinds: Mapping[str, Sequence[TrackKind]] | None = None,
    ) -> None:
        """``clocks``, ``track_ids`` (default 1, 2, ...) and ``kinds`` (default: every track
        continuous) per stream, in track order; the state (``restored``, :meth:`snapshot`) is a
        list per stream in that same order."""
        self.clocks = {stream: list(c) for stream, c in clocks.items()}
        kinds = kinds or {}
        self._continuous = {
            stream: [kind.continuous for kind in kinds[stream]] if stream in kinds else [True] * len(c)
            for stream, c in self.clocks.items()
        }
        for stream, flags in self._continuous.items():
            if len(flags) != len(self.clocks[stream]):
                raise ValueError(f"stream {stream}: one kind per track is needed")
        track_ids = track_ids or {}
        self._positions = {
            stream: {track_id: i for i, track_id in enumerate(track_ids.get(stream, range(1, len(c) + 1)))}
            for stream, c in self.clocks.items()
        }
        restored = restored or {}
        self._last: dict[str, list[int | None]] = {}
        for stream, c in self.clocks.items():
            last = list(restored.get(stream, ()))
            # A track added to the stream since the state was written starts with the stream.
            self._last[stream] = [*last[: len(c)], *[min(last, default=None)] * (len(c) - len(last))]
        # Kept as fragments are accepted, so that the per-fragment questions cost the same at
        # 1,000 streams as at one: completed() per stream, and the streams short of a final index.
        self._completed: dict[str, int | None] = {stream: self._minimum(stream) for stream in self._last}
        self._final: int | None = None
        self._short_of_final: set[str] = set()

    def judge(self, fragment: EncodedFragment) -> Judgement:
        """Decide whether ``fragment`` may go to the publishers; records it if accepted."""
        tracks = self._last.get(fragment.stream_id)
        position = self._positions.get(fragment.stream_id, {}).get(fragment.track_id, -1)
        if tracks is None or position < 0:
            return Judgement(Verdict.UNKNOWN_TRACK, f"no track {fragment.track_id} in stream {fragment.stream_id}")
        clock = self.clocks[fragment.stream_id][position]
        k = fragment.index
        start = clock.start(k)
        expected = (start, clock.start(k + 1) - start, clock.timescale)  # duration(k), without start(k) again
        actual = (fragment.start, fragment.duration, fragment.timescale)
        if actual != expected:
            return Judgement(Verdict.OFF_CLOCK, f"index {k} has (start, duration, timescale) {actual}; "
                                                f"the shared clock says {expected}")  # fmt: skip
        last = tracks[position]
        if last is not None and k <= last:
            return Judgement(Verdict.REPEAT, f"index {k} already emitted (last {last})")
        tracks[position] = k
        continuous = self._continuous[fragment.stream_id]
        done = self._completed[fragment.stream_id]
        # This track was (one of) the least advanced continuous ones, or the stream has none: the
        # completed index may move. A sparse track beside continuous ones never moves it.
        if (continuous[position] and (last is None or last == done)) or not any(continuous):
            done = self._completed[fragment.stream_id] = self._minimum(fragment.stream_id)
            if self._final is not None and done is not None and done >= self._final:
                self._short_of_final.discard(fragment.stream_id)
        skipped = 0 if last is None or not continuous[position] else k - last - 1
        return Judgement(Verdict.ACCEPTED, skipped=skipped)

    def _minimum(self, stream_id: str) -> int | None:
        """The least advanced continuous track's last index (None if one emitted nothing yet); a
        stream without continuous tracks: its most advanced track's."""
        tracks, continuous = self._last[stream_id], self._continuous[stream_id]
        gating = [t for t, c in zip(tracks, continuous, strict=True) if c]
        if not gating:
            return max((t for t in tracks if t is not None), default=None)
        return None if None in gating else min(t for t in gating if t is not None)

    def completed(self, stream_id: str) -> int | None:
        """The last index emitted on every continuous track of ``stream_id`` (kept up to date by
        :meth:`judge`, not worked out on every call)."""
        return self._completed[stream_id]

    def watch_final(self, final: int) -> None:
        """From now on, count the streams whose :meth:`completed` index is short of ``final``
        (:attr:`final_reached`); for a graceful stop at fragment ``final``."""
        self._final = final
        self._short_of_final = {s for s, done in self._completed.items() if done is None or done < final}

    @property
    def short_of_final(self) -> frozenset[str]:
        """The streams that have not completed the index given to :meth:`watch_final`."""
        return frozenset(self._short_of_final)

    @property
    def final_reached(self) -> bool:
        """Every stream has completed the index given to :meth:`watch_final` (False before it)."""
        return self._final is not None and not self._short_of_final

    def resume_floor(self) -> int | None:
        """The lowest index a new instance may start at: one past the least advanced stream
        (its other streams' repeats are dropped by :meth:`judge`). None before any fragment."""
        done = [self.completed(stream) for stream in self._last]
        if any(d is None for d in done):
            return None
        return min(d for d in done if d is not None) + 1

    def first_index(self, live: int) -> int:
        """Where a new instance starts, given the fragment live on the wall clock now."""
        floor = self.resume_floor()
        return live if floor is None else max(live, floor)

    def snapshot(self) -> dict[str, list[int]]:
        """What to persist: per stream, the last index emitted on each track (streams that have
        completed no index yet are left out). A sparse track that emitted nothing yet is written
        as the stream's completed index: a new instance starts after it, so the value forbids
        nothing that could come."""
        out = {}
        for stream, tracks in self._last.items():
            done = self._completed[stream]
            if done is not None:
                out[stream] = [done if t is None else t for t in tracks]
        return out


@dataclass(frozen=True)
class ClockIdentity:
    """What gives a persisted index its meaning; a state file with another identity is refused."""

    presentation: str
    epoch_ns: int
    fragment_duration: Fraction


def encode_state(identity: ClockIdentity, group: str, snapshot: Mapping[str, Sequence[int]],
                 clocks: Mapping[str, Sequence[TrackClock]]) -> bytes:  # fmt: skip
    """JSON bytes for the state file: per stream and track the last index and, for people, its
    time and timescale."""
    streams = {}
    for stream, indices in sorted(snapshot.items()):
        streams[stream] = {"tracks": [
            {"index": index, "time": clock.start(index), "timescale": clock.timescale}
            for index, clock in zip(indices, clocks[stream], strict=True)
        ]}  # fmt: skip
    document = {
        "format": STATE_FORMAT,
        "presentation": identity.presentation,
        "group": group,
        "epoch_ns": identity.epoch_ns,
        "fragment_duration": f"{identity.fragment_duration.numerator}/{identity.fragment_duration.denominator}",
        "streams": streams,
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def decode_state(data: bytes, identity: ClockIdentity, group: str) -> dict[str, list[int]]:
    """Per stream, the last index of each track from a state file. Raises StateMismatch (wrong presentation,
    clock or group) or ValueError (not a state file)."""
    try:
        document = json.loads(data)
        if document.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {document.get('format')!r}")
        numerator, denominator = (int(x) for x in str(document["fragment_duration"]).split("/"))
        theirs = ClockIdentity(str(document["presentation"]), int(document["epoch_ns"]),
                               Fraction(numerator, denominator))  # fmt: skip
        their_group = str(document["group"])
        streams = {
            str(stream): [int(track["index"]) for track in entry["tracks"]]
            for stream, entry in document["streams"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise ValueError(f"not a state file: {exc}") from None
    if theirs != identity or their_group != group:
        raise StateMismatch(f"state is for presentation {theirs.presentation!r}, group {their_group!r}, epoch "
                            f"{theirs.epoch_ns} ns, fragment duration {theirs.fragment_duration} s; this run is "
                            f"{identity.presentation!r}, {group!r}, {identity.epoch_ns} ns, "
                            f"{identity.fragment_duration} s")  # fmt: skip
    return streams
