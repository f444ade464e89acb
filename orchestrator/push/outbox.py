"""The outbox of one (stream, endpoint): fragments waiting to be sent, and the forward buffer of
fragments already sent that a reconnect must send again.

Theory of operation
-------------------
The encoder appends every fragment of a stream to the outbox of every endpoint of that stream
and never waits (``push``). The publisher takes fragments in order (``take``) and writes each
one to its long-running POST. Four rules make this lossless:

* **Catch-up backlog.** While an endpoint is slow or unreachable, fragments pile up in
  ``pending`` and are sent in order, as fast as the connection allows, once it is back. The
  backlog is bounded in media seconds (per track, the sum of the pending fragments' durations)
  and in bytes, whichever is reached first; beyond the bound the *oldest* fragments are dropped
  and returned to the caller, who counts and logs them. The live edge matters most.

* **Forward buffer (ingest spec 4.7 and 7.3).** Every fragment taken is also remembered in
  ``sent``. When a POST fails, ``rewind`` puts back at the head of ``pending`` (flagged as
  resends) the fragment that was being written, the last ``resend_per_track`` fragments of every
  track written completely before it (``written``), *and* every fragment whose bytes are within
  the *unconfirmed window*: the last ``unconfirmed_bytes + unacked`` bytes taken, where
  ``unacked`` is the most the shell saw in the failed connection's own send queue, not yet
  acknowledged by the peer (``observe_unacked``, Linux ``SIOCOUTQ``), and ``unconfirmed_bytes``
  stands for what lies beyond it: bytes the peer's kernel acknowledged but its application never
  read (its receive buffer, a proxy's buffers). This goes beyond the spec on purpose: an HTTP
  POST body has no acknowledgement, and a fragment "written" may still sit in our socket
  buffer, a proxy, or the peer's receive buffer when the connection dies. A receiver that
  stops reading (a hung ingest process, a request-buffering proxy) keeps accepting bytes until
  those buffers are full, which at a low bitrate can take longer than any stall, so no send
  timeout fires and the whole window is unconfirmed when the reset comes: the window is
  therefore never cut by how much the failed POST carried. The receiver drops duplicates by
  (stream, track, time) (spec 8.6, 9), so sending a fragment twice costs only bandwidth; not
  sending it costs the viewers a gap.

* **Progress across consecutive POSTs.** A path that resets every connection after N bytes
  (N smaller than the window) would, with the rule above alone, resend the same window on every
  POST and never advance. So each fragment counts how many rewinds *in a row* put it back; the
  window puts back a fragment at most ``max_put_back`` times (the fragment in flight and the
  spec's last fragments of each track always go back). A fragment written completely on
  ``max_put_back + 1`` consecutive POSTs that all broke is not sent again: such a path advances
  by about N / (max_put_back + 1) bytes per POST (less the fragments that always go back), while
  a single failure after a working POST (a stall, a reset) always resends the whole window.

  Memory per (stream, endpoint): the fragments taken within the unconfirmed window (1 MiB by
  default, plus what the send queue holds), the last ``resend_per_track`` fragments of each
  track and the one in flight; the fragment bytes are shared with the stream's other endpoints
  (one object per fragment). ``take`` forgets the rest from the oldest on, in constant time;
  what an old fragment kept for its track (a track that stopped producing) holds behind it is
  forgotten by a full pass once ``sent`` has doubled, so at most twice that (+ 8) is held.

* **Order.** Resends and pending fragments leave in the order they were produced, so timestamps
  on the new POST continue from where the receiver last saw them.

* **Sparse tracks.** The rules above that count per track assume a fragment for every index: a
  track whose fragments say they are not continuous (``EncodedFragment.continuous``, a sparse
  track of cues) has its last fragment whenever its last event was, maybe an hour ago. So for
  such a track the seconds bound is an *age*: a pending fragment that ended more than
  ``max_seconds`` before the newest fragment pushed (any track) is dropped, and is not counted
  in ``pending_seconds``; and the per-track resend keeps its last fragments only while they are
  that recent (an old cue is not sent again, nor kept for it). The byte bound, the unconfirmed
  window and the fragment in flight apply to it as to any other.

``close()`` ends the stream: what is pending is still handed out, then ``finished`` is true.
Pure: no clock, no I/O. The trio wake-up lives in :mod:`orchestrator.push.publisher`.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from fractions import Fraction

from orchestrator.fmp4.stream import EncodedFragment


def _end(fragment: EncodedFragment) -> Fraction:
    """Where ``fragment`` ends, in seconds since the epoch."""
    return Fraction(fragment.start + fragment.duration, fragment.timescale)


@dataclass(frozen=True)
class OutboxLimits:
    max_seconds: Fraction  # media seconds pending, per track
    max_bytes: int  # bytes pending
    resend_per_track: int = 2  # spec 4.7: the last two fragments of every track
    unconfirmed_bytes: int = 1024 * 1024  # also resend anything within this many bytes of the end
    max_put_back: int = 2  # ...at most this many rewinds in a row (progress on a path cut every N bytes)

    def __post_init__(self) -> None:
        if (self.max_seconds <= 0 or self.max_bytes <= 0 or self.resend_per_track < 0 or self.unconfirmed_bytes < 0
                or self.max_put_back < 0):  # fmt: skip
            raise ValueError("outbox limits must be positive")


@dataclass(frozen=True)
class Taken:
    """A fragment handed to the publisher; ``resend`` if it was sent before a failure."""

    fragment: EncodedFragment
    resend: bool
    put_back: int = 0  # how many rewinds in a row put this fragment back


@dataclass(frozen=True)
class _Sent:
    fragment: EncodedFragment
    end_offset: int  # bytes taken (over the outbox's life) up to and including this fragment
    put_back: int


class Outbox:
    def __init__(self, limits: OutboxLimits) -> None:
        self.limits = limits
        self._pending: deque[Taken] = deque()
        self._pending_bytes = 0
        self._pending_ticks: Counter[int] = Counter()  # track -> sum of pending durations
        self._timescales: dict[int, int] = {}
        self._sparse_tracks: set[int] = set()  # tracks whose fragments are not continuous
        self._sent: deque[_Sent] = deque()
        self._sent_per_track: Counter[int] = Counter()  # entries of each track in ``_sent``
        self._sent_after_trim = 0  # len(_sent) after the last full trim
        self._taken_bytes = 0
        self._unacked = 0  # the most the open connection's send queue held unacknowledged
        self._in_flight: _Sent | None = None  # taken, not yet reported written
        self._newest_end = Fraction(0)  # the latest end (seconds since the epoch) of any fragment pushed
        self._sparse_pending = 0  # pending fragments of non-continuous tracks
        self.closed = False
        self.dropped = 0
        self.resent = 0

    # --- the encoder's side -----------------------------------------------------------------

    def push(self, fragment: EncodedFragment) -> list[EncodedFragment]:
        """Queue ``fragment``; return the fragments dropped to stay within the bound, oldest first."""
        if self.closed:
            raise RuntimeError("push to a closed outbox")
        self._append(Taken(fragment, resend=False))
        return self._enforce_bound()

    def close(self) -> None:
        self.closed = True

    # --- the publisher's side ---------------------------------------------------------------

    def take(self) -> Taken | None:
        """The next fragment to write, or None if nothing is pending (see ``finished``)."""
        if not self._pending:
            return None
        item = self._pending.popleft()
        fragment = item.fragment
        self._count_pending(fragment, -1)
        self._taken_bytes += len(fragment.data)
        self._sent.append(_Sent(fragment, self._taken_bytes, item.put_back))
        self._sent_per_track[fragment.track_id] += 1
        self._in_flight = self._sent[-1]
        self._forget_oldest()
        if len(self._sent) > 2 * self._sent_after_trim + 8:
            self._trim_sent()
        if item.resend:
            self.resent += 1
        return item

    def peek(self) -> EncodedFragment | None:
        """The fragment ``take`` would return next, or None."""
        return self._pending[0].fragment if self._pending else None

    def written(self) -> None:
        """The fragment last taken was written completely to the POST. Until then it is *in
        flight*: a rewind always sends it again, on top of the last fragments written."""
        self._in_flight = None

    def observe_unacked(self, unacked_bytes: int) -> None:
        """The shell measured ``unacked_bytes`` in the open connection's send queue, not yet
        acknowledged by the peer; the unconfirmed window grows by the most seen on it."""
        self._unacked = max(self._unacked, unacked_bytes)

    def rewind(self) -> list[EncodedFragment]:
        """The POST failed: put the forward buffer back at the head of the queue, flagged as
        resends, and return what will be sent again (oldest first). See the module docstring
        for which fragments that is, and why a path cut every N bytes still advances."""
        again = self._select(self._window)
        self._unacked = 0  # the next connection starts with an empty send queue
        self._sent.clear()
        self._sent_per_track.clear()
        self._sent_after_trim = 0
        self._in_flight = None
        for fragment, put_back in reversed(again):
            self._pending.appendleft(Taken(fragment, resend=True, put_back=put_back + 1))
            self._count_pending(fragment, +1)
        # Over the bound, the oldest resends give way first; they were sent once already, so they
        # are not counted as dropped.
        self._enforce_bound()
        return [item.fragment for item in self._pending if item.resend]

    @property
    def unconfirmed_window(self) -> int:
        """Bytes the next rewind treats as unconfirmed: ``unconfirmed_bytes`` plus the most the
        open connection's send queue held unacknowledged."""
        return self._window

    @property
    def finished(self) -> bool:
        """Closed and drained: the publisher ends its POST."""
        return self.closed and not self._pending

    # --- what the metrics show --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_seconds(self) -> Fraction:
        """Media seconds pending: the largest over the stream's tracks."""
        return max(
            (Fraction(ticks, self._timescales[track]) for track, ticks in self._pending_ticks.items()
             if track not in self._sparse_tracks),
            default=Fraction(0),
        )  # fmt: skip

    @property
    def oldest_held(self) -> EncodedFragment | None:
        """The oldest fragment this outbox still holds, pending or kept for a rewind (None: it
        holds nothing). Never newer than what a rewind or a take could still hand out; it may be
        older by what the outbox has not forgotten yet (forgetting happens on take). A relay's
        spool keeps what some outbox holds (orchestrator.relay.spool)."""
        if self._sent:
            return self._sent[0].fragment
        return self._pending[0].fragment if self._pending else None

    @property
    def forward_buffer(self) -> list[EncodedFragment]:
        """What a rewind would send again now (oldest first)."""
        return [fragment for fragment, _ in self._select(self._window)]

    @property
    def _window(self) -> int:
        return self.limits.unconfirmed_bytes + self._unacked

    # --- internals --------------------------------------------------------------------------

    def _append(self, item: Taken) -> None:
        fragment = item.fragment
        self._timescales[fragment.track_id] = fragment.timescale
        if not fragment.continuous:
            self._sparse_tracks.add(fragment.track_id)
        self._newest_end = max(self._newest_end, _end(fragment))
        self._pending.append(item)
        self._count_pending(fragment, +1)

    def _count_pending(self, fragment: EncodedFragment, sign: int) -> None:
        self._pending_bytes += sign * len(fragment.data)
        self._pending_ticks[fragment.track_id] += sign * fragment.duration
        if not fragment.continuous:
            self._sparse_pending += sign

    def _recent(self, fragment: EncodedFragment) -> bool:
        """Whether ``fragment`` ended within ``max_seconds`` of the newest fragment pushed."""
        return self._newest_end - _end(fragment) <= self.limits.max_seconds

    def _next_victim(self) -> int | None:
        """Position in ``pending`` of the fragment to drop to get back within the bound, or None.

        Over the byte bound: the oldest fragment. Over the seconds bound: the oldest fragment of
        a track that is over it (dropping another track's fragment would not help). The newest
        fragment is always kept, even if it alone is over the bound."""
        if len(self._pending) <= 1:
            return None
        if self._pending_bytes > self.limits.max_bytes:
            return 0
        over = {
            track for track, ticks in self._pending_ticks.items()
            if track not in self._sparse_tracks and Fraction(ticks, self._timescales[track]) > self.limits.max_seconds
        }  # fmt: skip
        if not over and not self._sparse_pending:
            return None
        for position, item in enumerate(self._pending):
            fragment = item.fragment
            if fragment.track_id in over or (not fragment.continuous and not self._recent(fragment)):
                return position if position < len(self._pending) - 1 else None
        return None

    def _enforce_bound(self) -> list[EncodedFragment]:
        dropped = []
        while (position := self._next_victim()) is not None:
            item = self._pending[position]
            del self._pending[position]
            fragment = item.fragment
            self._count_pending(fragment, -1)
            if not item.resend:
                dropped.append(fragment)
        self.dropped += len(dropped)
        return dropped

    def _select(self, window: int) -> list[tuple[EncodedFragment, int]]:
        """(fragment, put_back) of the sent fragments a rewind puts back, oldest first: the one in
        flight; the last ``resend_per_track`` of each track; and those ending within the last
        ``window`` bytes taken that were put back fewer than ``max_put_back`` times in a row.
        (A track that stops producing must not pin the others.)"""
        keep: list[tuple[EncodedFragment, int]] = []
        rank: Counter[int] = Counter()
        for sent in reversed(self._sent):
            if sent is self._in_flight:
                keep.append((sent.fragment, sent.put_back))
                continue
            track = sent.fragment.track_id
            rank[track] += 1
            unconfirmed = self._taken_bytes - sent.end_offset < window and sent.put_back < self.limits.max_put_back
            if self._kept_for_track(sent.fragment, rank[track]) or unconfirmed:
                keep.append((sent.fragment, sent.put_back))
        keep.reverse()
        return keep

    def _forget_oldest(self) -> None:
        """Forget, from the oldest on, the sent fragments a rewind could no longer select: those
        not among the last ``resend_per_track`` of their track (the oldest one's rank in its track
        is the number of its track's fragments in ``sent``, the one in flight not counted) and
        no longer within the window. Runs on every ``take``: usually one fragment, constant time.
        Older fragments kept for their track (a track that stopped producing) can hold newer
        forgettable ones behind them; :meth:`_trim_sent` forgets those, when ``sent`` has
        doubled since it last ran."""
        limits, window, in_flight = self.limits, self._window, self._in_flight
        while self._sent:
            oldest = self._sent[0]
            if oldest is in_flight:
                return
            track = oldest.fragment.track_id
            rank = self._sent_per_track[track] - (in_flight is not None and in_flight.fragment.track_id == track)
            if self._kept_for_track(oldest.fragment, rank):
                return
            if self._taken_bytes - oldest.end_offset < window and oldest.put_back < limits.max_put_back:
                return
            self._sent.popleft()
            self._sent_per_track[track] -= 1

    def _kept_for_track(self, fragment: EncodedFragment, rank: int) -> bool:
        """Whether a rewind resends ``fragment`` as one of the last ``resend_per_track`` of its
        track (``rank``: 1 for the newest sent): a sparse track's only while it is recent."""
        return rank <= self.limits.resend_per_track and (fragment.continuous or self._recent(fragment))

    def _trim_sent(self) -> None:
        """Forget everything a rewind could no longer select (a pass over ``sent``)."""
        keep = {id(fragment) for fragment, _ in self._select(self._window)}
        if len(keep) != len(self._sent):
            self._sent = deque(s for s in self._sent if id(s.fragment) in keep)
            self._sent_per_track = Counter(s.fragment.track_id for s in self._sent)
        self._sent_after_trim = len(self._sent)
