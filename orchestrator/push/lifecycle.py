"""The publisher's request lifecycle as a state machine: events and ``now`` in, the next action out.

Theory of operation
-------------------
A publisher pushes one stream to one endpoint and never gives up (ingest spec 4, 7). What it
does next depends only on what just happened and on the clock, so that decision lives here, in
the style of h11: :meth:`Lifecycle.handle` takes an event (what the shell saw or did) and
``now`` (seconds, the shell's monotonic clock) and returns one action (what the shell must do
next); the shell does that I/O and reports its outcome as the next event. No I/O, no clock, no
randomness of its own (the retry jitter is a function given in). Everything that affects a
transition is in this module: the table in :meth:`Lifecycle.handle` lists every (state, event)
pair that is allowed; any other pair is a bug in the shell (:class:`LifecycleError`).

A request's path, for Smooth ingest (one long POST per stream, :data:`SMOOTH`)::

    IDLE --Work--> PROBING --Answered 2xx--> OPENING --Opened--> POSTING  (SendHeader, then Next)
    POSTING: Ready -> SendFragment -> Written -> Next ... ; Empty -> Wait(until idle) or Finish(idle)
             Drained -> Finish(end_of_stream); HeaderChanged -> Finish(header_changed)
    FINISHING --Answered 2xx--> IDLE (Completed: then wait for work; Drained there -> DONE)

Any failure (a non-2xx answer, an answer during the body, a transport error, a response
deadline) goes to REWINDING with :class:`Rewind` (the shell records the failure and rewinds the
outbox: spec 4.7, 7.3), then to BACKING_OFF with :class:`BackOff` (``until`` from the retry
policy: the first retry after a request that carried new fragments is immediate) and back to
IDLE; or, if the outbox is closed and the endpoint has failed three times in a row, to DONE
(:data:`ABANDON`: stopping while the endpoint is down). Deadlines are numbers held here:
``idle_at`` (the open request has had nothing to send for ``idle_timeout``: spec 7.6) and
``backoff_until``. The per-chunk send deadline and the connect deadline are the transport's
(``within`` on each call), the response deadline is :attr:`Finish.within`.

The wire format's :class:`~orchestrator.wire.format.RequestPlan` says how a stream maps onto
requests, so that a format with one request per segment (CMAF ingest) is a different plan, not a different publisher:

* ``per="stream"``: one long request; after it ends (idle, header change) the next one starts
  with a probe again if ``probe_first``.
* ``per="segment"``: each request carries one fragment and is then finished
  (:class:`Finish` with reason ``segment``); the next fragment opens the next request without a
  probe; a failure starts a new session (probe again if ``probe_first``).
* ``header_on_every_request``: the stream header opens every request; if False, only the first
  request of a session carries it.
* ``header_alone`` (CMAF ingest): that first request carries the header and nothing else; it is
  finished (reason ``header``) once the header is written, and the next request carries the
  first fragment. :attr:`Lifecycle.header_due` tells the shell which request comes next.

The URL of each request is the shell's (today one URL per stream; a per-segment format names
each segment's URL through the wire format).

Keep-alive, per segment. A per-segment plan sends one request per segment, every segment
duration, to the same host: opening a TCP (and TLS) connection for each would cost a handshake
or three per segment and is what the ingest spec asks senders not to do (Interface-1: a
persistent connection per track). So after a per-segment request succeeds on a connection that
can carry another (:attr:`Answered.reusable`: both sides finished their message and neither said
``Connection: close``), :class:`Completed` says ``keep``, and the lifecycle remembers until when
the kept connection may be reused (``kept_until``: ``keepalive_timeout`` after the answer).
The next :class:`Open` says ``reuse`` if it comes before then; the shell carries the request on
the kept connection (or opens a new one, without a failure, if the server closed it while it
was idle). At ``kept_until`` the shell closes it (:class:`Expired`), and an ``Open`` without
``reuse`` tells the shell to close any connection it still keeps *before* opening a new one, so
a publisher never holds two. Any failure forgets the kept connection (the shell closes the
failed one): the next request is a new connection, and the resend rules above are unchanged.
A per-stream plan (Smooth) never keeps a connection. The connect deadline is the plan's too
(:attr:`Lifecycle.connect_timeout`): one segment duration per segment (the spec's "about one
segment duration"), the spec's 10 s for one long request.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.errors import EndpointError, LifecycleError
from orchestrator.push.failures import answered_mid_body, failure_of, status_error, timed_out
from orchestrator.push.reconnect import Failure, RetryPolicy
from orchestrator.wire import smooth
from orchestrator.wire.format import RequestPlan

SMOOTH = smooth.PLAN
"""Smooth Streaming live ingest: one long chunked POST per stream, an empty POST before each."""


@dataclass(frozen=True)
class PublisherSettings:
    connect_timeout: float = 10.0  # spec 7.1 (Smooth); a per-segment plan uses segment_connect_timeout
    send_timeout: float = 4.0  # spec 7.2: between N and 2N for N-second fragments
    response_timeout: float = 10.0  # waiting for the final response after the last chunk
    idle_timeout: float = 8.0  # end a POST with nothing to send (spec 7.6)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Per segment (CMAF ingest): the connect deadline, about one segment duration (Interface-1),
    # and how long a connection kept between requests may sit unused before it is closed.
    segment_connect_timeout: float = 2.0
    keepalive_timeout: float = 6.0

    @classmethod
    def for_fragment_duration(cls, seconds: float, **overrides: Any) -> PublisherSettings:
        """The settings for ``seconds``-long fragments; any field can be overridden.

        ``segment_connect_timeout``: one fragment duration, at least 1 s (a TLS handshake over a
        long path takes a few hundred milliseconds). ``keepalive_timeout``: three fragment
        durations, at most 30 s. While a track is live its connection is reused every fragment
        duration, so this bound only ends a connection left unused by a pause (an encoder
        restart, a stop); 30 s stays under the idle timeouts of the middleboxes and servers in
        front of origins (60 s for an AWS load balancer, 75 s for nginx and for ``orchestrator
        ingest``), which may drop a connection without a word. A server with a shorter one
        (Apache's 5 s) closes first, which the shell sees before reusing the connection."""
        settings = {"send_timeout": max(2.0, 1.5 * seconds), "idle_timeout": 3.0 * seconds,
                    "segment_connect_timeout": max(1.0, seconds), "keepalive_timeout": min(30.0, 3.0 * seconds),
                    **overrides}  # fmt: skip
        return cls(**settings)


class State(enum.Enum):
    IDLE = "idle"  # no request open: waiting for work
    PROBING = "probing"  # the empty POST is under way
    OPENING = "opening"  # connecting the request
    POSTING = "posting"  # the body is being sent
    FINISHING = "finishing"  # the body is ended: awaiting the answer
    REWINDING = "rewinding"  # a failure: the shell records it and rewinds the outbox
    BACKING_OFF = "backing_off"  # waiting until ``backoff_until``
    DONE = "done"  # the outbox is finished (or abandoned): the publisher returns


# --- events: what the shell saw or did ------------------------------------------------------


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        return type(self).__name__


class Work(Event):
    """IDLE: the outbox has a fragment pending."""


class Drained(Event):
    """The outbox is closed and has nothing left (IDLE: stop; POSTING: end the body)."""


class Ready(Event):
    """POSTING: a fragment is pending."""


class Empty(Event):
    """POSTING: nothing to send now (the shell then waits, or is woken past ``idle_at``)."""


class HeaderChanged(Event):
    """POSTING: the encoder announced a different stream header (spec 7.5.c)."""


class Opened(Event):
    """OPENING: the request's connection is open."""


class HeaderSent(Event):
    """POSTING: the request head (and the stream header, if asked) is written."""


@dataclass(frozen=True, slots=True)
class Written(Event):
    """POSTING: the fragment taken for :data:`SEND_FRAGMENT` is written completely."""

    new: bool  # sent for the first time (not a resend after a rewind)


@dataclass(frozen=True, slots=True)
class Answered(Event):
    """The endpoint answered: the probe, the request after its body, or during the body.
    ``reusable``: after the body, the connection can carry another request (HTTP/1.1 keep-alive:
    the response is complete and neither side said ``Connection: close``)."""

    status: int
    reason: str = ""
    reusable: bool = False


@dataclass(frozen=True, slots=True)
class Failed(Event):
    """The transport failed (connect, write, read) or a transport deadline passed."""

    error: EndpointError


class TimedOut(Event):
    """PROBING, FINISHING: no answer within the response timeout."""


@dataclass(frozen=True, slots=True)
class Rewound(Event):
    """REWINDING: the failure is recorded and the outbox rewound; ``stopping`` if it is closed."""

    stopping: bool


class BackedOff(Event):
    """BACKING_OFF: ``backoff_until`` has passed."""


class Expired(Event):
    """IDLE: ``kept_until`` passed before the next request; the shell closed the kept connection."""


WORK, DRAINED, READY, EMPTY, HEADER_CHANGED = Work(), Drained(), Ready(), Empty(), HeaderChanged()
OPENED, HEADER_SENT, TIMED_OUT, BACKED_OFF, EXPIRED = Opened(), HeaderSent(), TimedOut(), BackedOff(), Expired()
WRITTEN_NEW, WRITTEN_RESEND = Written(new=True), Written(new=False)


# --- actions: what the shell must do next ---------------------------------------------------


class Action:
    __slots__ = ()

    def __repr__(self) -> str:
        return type(self).__name__


class WaitForWork(Action):
    """Wait until the outbox has a fragment (then :data:`WORK`) or is finished (:data:`DRAINED`)."""


class Probe(Action):
    """Send the empty POST; report :class:`Answered`, :data:`TIMED_OUT` or :class:`Failed`."""


@dataclass(frozen=True, slots=True)
class Open(Action):
    """Open the request's connection; report :data:`OPENED` or :class:`Failed`. With ``reuse``,
    the connection kept from the last request carries it (a new one if the server has closed
    that one meanwhile); without, a kept connection is closed before a new one is opened."""

    reconnect: bool  # the first request since a failure (counted as a reconnect)
    reuse: bool = False


@dataclass(frozen=True, slots=True)
class SendHeader(Action):
    """Write the request head, then the stream header as the body's first chunk if ``with_header``."""

    with_header: bool


class Next(Action):
    """Look at the outbox: report :data:`READY`, :data:`EMPTY`, :data:`DRAINED` or
    :data:`HEADER_CHANGED` (or the endpoint's answer, if one came during the body)."""


class SendFragment(Action):
    """Take the next fragment from the outbox and write it as one chunk; report :class:`Written`."""


@dataclass(frozen=True, slots=True)
class Wait(Action):
    """Nothing to send: wait for the outbox to change, at most until ``until``, then look again."""

    until: float


@dataclass(frozen=True, slots=True)
class Finish(Action):
    """End the body (the zero-length chunk) and await the answer for ``within`` seconds."""

    reason: Literal["end_of_stream", "idle", "header_changed", "segment", "header"]
    within: float


@dataclass(frozen=True, slots=True)
class Completed(Action):
    """The request succeeded with ``status``; then wait for work. ``keep``: keep its connection
    for the next request, closing it at :attr:`Lifecycle.kept_until` if none comes by then."""

    status: int
    keep: bool = False


@dataclass(frozen=True, slots=True)
class Rewind(Action):
    """Record the failure, rewind the outbox; report :class:`Rewound`."""

    failure: Failure
    error: EndpointError
    attempt: int  # failures in a row, this one included


@dataclass(frozen=True, slots=True)
class BackOff(Action):
    """Wait until ``until`` (``delay`` seconds from the failure); report :data:`BACKED_OFF`."""

    until: float
    delay: float
    attempt: int


class Abandon(Action):
    """Stop: the outbox is closed and the endpoint keeps failing; what is queued is lost here."""


class Done(Action):
    """Stop: the outbox is finished."""


WAIT_FOR_WORK, PROBE, NEXT, SEND_FRAGMENT, ABANDON, DONE = (
    WaitForWork(),
    Probe(),
    Next(),
    SendFragment(),
    Abandon(),
    Done(),
)
OPEN, OPEN_AFTER_FAILURE, OPEN_REUSED = Open(reconnect=False), Open(reconnect=True), Open(reconnect=False, reuse=True)
SEND_HEAD_AND_HEADER, SEND_HEAD_ONLY = SendHeader(with_header=True), SendHeader(with_header=False)

_Handler = Callable[["Lifecycle", Any, float], Action]


class Lifecycle:
    """One publisher's request lifecycle. See the module docstring."""

    def __init__(self, url: str, settings: PublisherSettings, plan: RequestPlan = SMOOTH,
                 jitter: Callable[[], float] = random.random) -> None:  # fmt: skip
        self.url = url
        self.settings = settings
        self.plan = plan
        self.jitter = jitter  # a fraction in [0, 1) per backoff (tests pass a constant)
        self.state = State.IDLE
        self.idle_at = 0.0  # POSTING: when the open request has had nothing to send for idle_timeout
        self.backoff_until = 0.0
        self.consecutive_failures = 0
        self.new_in_request = 0  # fragments written for the first time on the current request
        self._failure: Failure | None = None  # the failure being handled (REWINDING)
        self._failed_since_request = False  # the next request counts as a reconnect
        self._session = False  # per segment: a request succeeded since the last failure or idle spell
        self._header_sent = False  # the stream header went out in this session
        self._header_alone = False  # the open request carries the header alone
        self.kept_until: float | None = None  # IDLE, per segment: a connection is kept until then

    def handle(self, event: Event, now: float) -> Action:
        """The action that follows ``event`` at ``now``; updates the state.

        Raises LifecycleError for an event the current state does not expect."""
        handler = _TABLE.get((self.state, type(event)))
        if handler is None:
            raise LifecycleError(f"{event!r} is not expected in state {self.state.value}")
        return handler(self, event, now)

    # --- IDLE -------------------------------------------------------------------------------

    def _work(self, event: Work, now: float) -> Action:
        self.new_in_request = 0
        if self.plan.probe_first and not self._session:
            self.state = State.PROBING
            return PROBE
        return self._open(now)

    def _drained_idle(self, event: Drained, now: float) -> Action:
        self.state = State.DONE
        self.kept_until = None  # the shell closes what it keeps as it returns
        return DONE

    def _expired(self, event: Expired, now: float) -> Action:
        if self.kept_until is None or now < self.kept_until:
            raise LifecycleError(f"no kept connection expires at {now}")
        self.kept_until = None
        return WAIT_FOR_WORK

    # --- PROBING, OPENING -------------------------------------------------------------------

    def _probe_answered(self, event: Answered, now: float) -> Action:
        error = status_error(self.url, event.status, event.reason)
        return self._fail(error) if error is not None else self._open(now)

    def _open(self, now: float) -> Action:
        self.state = State.OPENING
        self.new_in_request = 0
        reconnect, self._failed_since_request = self._failed_since_request, False
        reuse = self.kept_until is not None and now < self.kept_until
        self.kept_until = None  # in use (or to be closed): kept again only once this request succeeds
        if reuse:
            return OPEN_REUSED
        return OPEN_AFTER_FAILURE if reconnect else OPEN

    @property
    def connect_timeout(self) -> float:
        """The connect deadline: about one segment duration per segment, spec 7.1's per stream."""
        if self.plan.per == "segment":
            return self.settings.segment_connect_timeout
        return self.settings.connect_timeout

    @property
    def header_due(self) -> bool:
        """The next request carries the stream header (with ``header_alone``: only the header)."""
        return self.plan.header_on_every_request or not self._header_sent

    def _opened(self, event: Opened, now: float) -> Action:
        self.state = State.POSTING
        self.idle_at = now + self.settings.idle_timeout
        self._header_alone = self.plan.header_alone and self.header_due
        return SEND_HEAD_AND_HEADER if self.header_due else SEND_HEAD_ONLY

    # --- POSTING: the hot path (one Ready and one Written per fragment) ---------------------

    def _header_sent_event(self, event: HeaderSent, now: float) -> Action:
        self._header_sent = True
        if self._header_alone:
            return self._finish("header")
        return NEXT

    def _ready(self, event: Ready, now: float) -> Action:
        self.idle_at = now + self.settings.idle_timeout
        return SEND_FRAGMENT

    def _written(self, event: Written, now: float) -> Action:
        if event.new:
            self.new_in_request += 1
        if self.plan.per == "segment":
            return self._finish("segment")
        return NEXT

    def _empty(self, event: Empty, now: float) -> Action:
        if now >= self.idle_at:
            return self._finish("idle")
        return Wait(self.idle_at)

    def _drained_posting(self, event: Drained, now: float) -> Action:
        return self._finish("end_of_stream")

    def _header_changed(self, event: HeaderChanged, now: float) -> Action:
        return self._finish("header_changed")

    def _answered_mid_body(self, event: Answered, now: float) -> Action:
        return self._fail(answered_mid_body(self.url, event.status, event.reason))

    def _finish(self, reason: Literal["end_of_stream", "idle", "header_changed", "segment", "header"]) -> Action:
        self.state = State.FINISHING
        return Finish(reason, self.settings.response_timeout)

    # --- FINISHING --------------------------------------------------------------------------

    def _final_answer(self, event: Answered, now: float) -> Action:
        error = status_error(self.url, event.status, event.reason)
        if error is not None:
            return self._fail(error)
        self.state = State.IDLE
        if not self._header_alone:  # a header alone is no progress: a path that takes headers but
            self.consecutive_failures = 0  # breaks every segment must back off, not retry at once forever
        # One long request per stream: the next one is a new session (probe, header). Per
        # segment, the session goes on.
        self._session = self.plan.per == "segment"
        if self.plan.per == "segment" and event.reusable:
            self.kept_until = now + self.settings.keepalive_timeout
            return Completed(event.status, keep=True)
        return Completed(event.status)

    def _response_timed_out(self, event: TimedOut, now: float) -> Action:
        return self._fail(timed_out(self.url, "response", self.settings.response_timeout))

    # --- failures ---------------------------------------------------------------------------

    def _failed(self, event: Failed, now: float) -> Action:
        return self._fail(event.error)

    def _fail(self, error: EndpointError) -> Action:
        # A request that carried new fragments was a working connection: retry at once.
        self.consecutive_failures = 1 if self.new_in_request else self.consecutive_failures + 1
        self.new_in_request = 0
        self._failure = failure_of(error)
        self._failed_since_request = True
        self._session = False
        self._header_sent = False
        self.kept_until = None
        self.state = State.REWINDING
        return Rewind(self._failure, error, self.consecutive_failures)

    def _rewound(self, event: Rewound, now: float) -> Action:
        if event.stopping and self.consecutive_failures > 2:
            self.state = State.DONE
            return ABANDON
        assert self._failure is not None
        delay = self.settings.retry.delay(self.consecutive_failures, self._failure, self.jitter())
        self.state = State.BACKING_OFF
        self.backoff_until = now + delay
        return BackOff(self.backoff_until, delay, self.consecutive_failures)

    def _backed_off(self, event: BackedOff, now: float) -> Action:
        self.state = State.IDLE
        return WAIT_FOR_WORK


_S = State
_TABLE: dict[tuple[State, type[Event]], _Handler] = {
    (_S.IDLE, Work): Lifecycle._work,
    (_S.IDLE, Drained): Lifecycle._drained_idle,
    (_S.IDLE, Expired): Lifecycle._expired,
    (_S.PROBING, Answered): Lifecycle._probe_answered,
    (_S.PROBING, TimedOut): Lifecycle._response_timed_out,
    (_S.PROBING, Failed): Lifecycle._failed,
    (_S.OPENING, Opened): Lifecycle._opened,
    (_S.OPENING, Failed): Lifecycle._failed,
    (_S.POSTING, HeaderSent): Lifecycle._header_sent_event,
    (_S.POSTING, Ready): Lifecycle._ready,
    (_S.POSTING, Written): Lifecycle._written,
    (_S.POSTING, Empty): Lifecycle._empty,
    (_S.POSTING, Drained): Lifecycle._drained_posting,
    (_S.POSTING, HeaderChanged): Lifecycle._header_changed,
    (_S.POSTING, Answered): Lifecycle._answered_mid_body,
    (_S.POSTING, Failed): Lifecycle._failed,
    (_S.FINISHING, Answered): Lifecycle._final_answer,
    (_S.FINISHING, TimedOut): Lifecycle._response_timed_out,
    (_S.FINISHING, Failed): Lifecycle._failed,
    (_S.REWINDING, Rewound): Lifecycle._rewound,
    (_S.BACKING_OFF, BackedOff): Lifecycle._backed_off,
}
