"""What a running process knows about itself, as plain data: the status view, the ``/status``
and ``/readyz`` endpoints and the tests read it; the encoders and publishers update it. No I/O,
no trio.

Theory of operation
-------------------
Each publisher owns one :class:`PublisherState`, each group encoder one :class:`GroupState` and
one :class:`EncoderState` per stream; :class:`LiveState` lists them all. The owners call the
small methods below (``now`` is passed in: the monotonic clock for ages, the wall clock for
"when" a reader in another process can show), so the rules of what a state means live here, in
one place, and the shells stay one-liners. :mod:`orchestrator.ops.status` turns a
:class:`LiveState` into the ``/status`` document; nothing else reads these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

# What went wrong last, as :class:`orchestrator.push.reconnect.Failure` values; the view names
# "unauthorized" and "not_found" (a person has to fix them) apart from the transient ones.
OPERATOR_FAILURES = ("unauthorized", "not_found")


@dataclass
class PublisherState:
    """One publisher (group, stream, endpoint): what the status view and ``/status`` show."""

    group: str
    stream_id: str
    endpoint: str
    region: str = ""
    connected: bool = False
    since_wall: float | None = None  # when ``connected`` last changed (or the publisher started)
    problem: str | None = None  # the failure kind since the last POST that streamed; None: healthy
    last_index: int | None = None
    last_push_monotonic: float | None = None
    failures: int = 0
    last_error: str | None = None
    last_error_wall: float | None = None
    fragments_pushed: int = 0
    resent: int = 0
    dropped: int = 0
    reconnects: int = 0
    retry_delay: float = 0.0  # the backoff step being waited out now (0 while connected)
    backlog_fragments: int = 0
    backlog_bytes: int = 0
    backlog_seconds: float = 0.0

    def set_connected(self, connected: bool, now_wall: float) -> None:
        if connected != self.connected or self.since_wall is None:
            self.since_wall = now_wall
        self.connected = connected
        if connected:
            self.problem = None
            self.retry_delay = 0.0

    def record_failure(self, kind: str, error: str, now_wall: float) -> None:
        """A probe or POST failed; ``kind`` is a :class:`~orchestrator.push.reconnect.Failure` value."""
        self.failures += 1
        self.problem = kind
        self.last_error = error
        self.last_error_wall = now_wall

    def record_push(self, index: int, resend: bool, now_monotonic: float) -> None:
        self.last_index = index
        self.last_push_monotonic = now_monotonic
        self.fragments_pushed += 1
        if resend:
            self.resent += 1

    def set_backlog(self, fragments: int, size: int, seconds: float) -> None:
        self.backlog_fragments, self.backlog_bytes, self.backlog_seconds = fragments, size, seconds


PEER_AGREES = "agrees"  # the peer's mapping is ours: the same source frame under the same tick
PEER_DIFFERS = "differs"  # same source timeline, another offset: ``ticks`` apart (one group will move)
PEER_OTHER_TIMELINE = "other_timeline"  # offsets more than the lock's window apart (a discontinuity)
PEER_UNREACHABLE = "unreachable"  # its /metrics did not answer
PEER_NO_MAPPING = "no_mapping"  # it answered without a live mapping (not locked yet, or not live)


@dataclass(frozen=True)
class PeerAgreement:
    """Whether a live group's mapping agrees with one peer group's, as its last check read it.

    ``peer`` is the peer group's name (from the ``group`` label of what it exports), or the
    peer's URL when it did not answer or exported no mapping; ``ticks`` is the peer's offset
    minus ours (90 kHz ticks, signed, the shorter way round the 33-bit wrap) when it differs or
    is on another timeline, else None."""

    peer: str
    state: str
    ticks: int | None = None


@dataclass
class EncoderState:
    """One (group, stream): the last fragment index the group's encoder completed for it."""

    group: str
    stream_id: str
    last_index: int | None = None
    completed_monotonic: float | None = None  # when ``last_index`` completed: the monitor's "stale" rule
    fragments: int = 0
    lock: str | None = None  # how its content is locked: pattern, file, or a live lock's origin (peer, saved, ...)
    content_offset: float | None = None  # the stream's first track, as orchestrator_content_offset_seconds
    peers: tuple[PeerAgreement, ...] = ()  # a live lock's agreement with each peer, at the last check


@dataclass
class GroupState:
    """One group's encoder instance (it encodes every stream of the group)."""

    group: str
    up: bool = False
    restarts: int = 0
    last_exit_code: int | None = None
    last_error: str | None = None
    last_error_wall: float | None = None
    since_wall: float | None = None  # when ``up`` last changed

    def set_up(self, up: bool, now_wall: float) -> None:
        if up != self.up or self.since_wall is None:
            self.since_wall = now_wall
        self.up = up

    def record_failure(self, error: str, exit_code: int | None, now_wall: float) -> None:
        self.last_error = error
        self.last_error_wall = now_wall
        if exit_code is not None:
            self.last_exit_code = exit_code


@dataclass
class LiveState:
    """Every publisher, encoder and group state of one process: all the status view needs."""

    presentation: str = ""
    fragment_duration: float = 0.0
    # The shared clock, exact: a fragment index's wall time is epoch + index x duration.
    epoch_ns: int | None = None
    fragment_duration_exact: Fraction | None = None
    started_wall: float | None = None  # when ``up`` started
    stopping: bool = False  # a graceful stop is under way: encoders finishing, publishers ending
    archives: list[str] = field(default_factory=list)  # --local-ingest: one archive directory per server
    state_dir: str | None = None  # the profile's [state] dir, if any
    publishers: list[PublisherState] = field(default_factory=list)
    encoders: list[EncoderState] = field(default_factory=list)
    groups: list[GroupState] = field(default_factory=list)
