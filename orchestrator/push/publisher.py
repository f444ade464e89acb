"""Publisher: pushes one stream to one ingest endpoint, and never gives up on it.

One :class:`Publisher` task runs per (group, stream, endpoint). It follows the ingest spec,
sections 4 and 7:

1. an empty-body POST to ``<publishing point>/Streams(<id>)`` probes the endpoint (it is sent
   with ``Connection: close``, so the POST that follows always opens a new connection); a
   401/403/404 is a named error (:class:`EndpointUnauthorized`, :class:`EndpointNotFound`),
   logged plainly and retried slowly so a fixed credential or publishing point recovers;
2. a long-running POST with chunked transfer encoding whose body is the stream header (ftyp,
   Live Server Manifest, moov: the same bytes on every POST) followed by fragments taken from
   this endpoint's own :class:`EndpointOutbox`, oldest first;
3. when the stream ends (shutdown), the body is finished (the zero-length chunk) and the final
   response awaited. A POST with nothing to send for ``idle_timeout`` is ended the same way
   (spec 7.6: a POST that does not move data keeps the server from disconnecting us); the next
   fragment opens a new one.

Any failure ends the POST. Each chunk (a fragment) must be written within ``send_timeout``
(spec 7.2: between N and 2N for N-second fragments), which is also what terminates a POST that
is not moving data at a rate commensurate with the fragment duration (a slow drip, a black
hole). The outbox is rewound (its forward buffer, at least the last two fragments of every
track, goes back to the head of the queue: spec 4.7, 7.3, 7.5.d), the publisher waits as
:class:`~orchestrator.push.reconnect.RetryPolicy` says (first retry immediate, then capped
exponential backoff with jitter, forever) and starts again with a new probe and a new POST.
Fragments produced meanwhile wait in the outbox's bounded backlog and go out as fast as the
connection allows once the endpoint is back.

The decisions (what to do next, when to give up on an idle POST, how long to back off, which
error a status means) are the pure :class:`~orchestrator.push.lifecycle.Lifecycle` and
:mod:`orchestrator.push.failures`; this shell does the I/O each action asks for, through the
:class:`~orchestrator.push.transport.Transport` seam (:mod:`orchestrator.push.connection` in
``up``: h11 over trio streams), and reports metrics, state and log events. A reader task reads
the endpoint's answer for the whole life of a POST, so an answer (or the connection closing)
during the body ends it at once.

Connections. Smooth: one per request (the probe's, the POST's). Per segment (CMAF ingest): the
publisher keeps the connection of a request that succeeded and carries the next request on it,
as the lifecycle says (:class:`~orchestrator.push.lifecycle.Open` ``reuse``,
:class:`~orchestrator.push.lifecycle.Completed` ``keep``), and closes it when the lifecycle's
``kept_until`` passes with no request; a connection the server has closed meanwhile is replaced
by a new one without a failure. It holds one connection at most: a kept one is closed before
another is opened. ``orchestrator_connections_opened_total`` counts every connection opened.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Sequence

import trio

from orchestrator.errors import EndpointError, EndpointNotFound, EndpointUnauthorized
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.ops.metrics import LabelledChildren, Metrics
from orchestrator.ops.state import PublisherState
from orchestrator.profile import Endpoint
from orchestrator.push.connection import Connector
from orchestrator.push.failures import answered_mid_body
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.lifecycle import (
    ABANDON,
    BACKED_OFF,
    DONE,
    DRAINED,
    EMPTY,
    EXPIRED,
    HEADER_CHANGED,
    HEADER_SENT,
    NEXT,
    OPENED,
    PROBE,
    READY,
    SEND_FRAGMENT,
    SMOOTH,
    TIMED_OUT,
    WAIT_FOR_WORK,
    WORK,
    WRITTEN_NEW,
    WRITTEN_RESEND,
    Action,
    Answered,
    BackOff,
    Completed,
    Event,
    Failed,
    Finish,
    Lifecycle,
    Open,
    Rewind,
    Rewound,
    SendHeader,
    Wait,
)
from orchestrator.push.lifecycle import PublisherSettings as PublisherSettings  # re-exported: callers import it here
from orchestrator.push.outbox import Taken
from orchestrator.push.reconnect import Failure
from orchestrator.push.transport import Connection, Response, Target, Transport
from orchestrator.wire.format import RequestPlan

log = logging.getLogger(__name__)

USER_AGENT = "orchestrator"
METHOD = "POST"  # every request's (orchestrator.push.connection sends POST): what a signer signs

# Signs one request: (method, URL, body) -> headers to add (orchestrator.push.sigv4.RequestSigner).
Signer = Callable[[str, str, bytes], Sequence[tuple[str, str]]]


class Publisher:
    def __init__(
        self,
        *,
        group: str,
        stream_id: str,
        endpoint: Endpoint,
        header: HeaderBoard,
        outbox: EndpointOutbox,
        metrics: Metrics,
        settings: PublisherSettings,
        connector: Transport | None = None,
        authorization: str | None = None,
        extra_headers: dict[str, str] | None = None,
        connect_slots: trio.CapacityLimiter | None = None,
        idle_sweeper: IdleSweeper | None = None,
        plan: RequestPlan = SMOOTH,
        url: str | None = None,
        segment_url: Callable[[EncodedFragment], str] | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.group = group
        self.stream_id = stream_id
        self.endpoint = endpoint
        # The request URL is the wire format's (Smooth: <publishing point>/Streams(<id>)). A
        # per-segment plan names a URL per segment, which the shell does not build yet (CMAF
        # ingest): such a publisher is given its one URL explicitly.
        if url is None:
            if plan.per != "stream":
                raise ValueError("a per-segment request plan needs an explicit url until segment URLs are wired")
            url = plan.url(endpoint.url, stream_id)
        self.url = url
        self.target = Target.parse(self.url)
        # Per segment (CMAF ingest): each fragment's request goes to segment_url(fragment), the
        # header alone to ``url``; see _target_for_request.
        self.segment_url = segment_url
        self._planned: EncodedFragment | None = None  # the fragment the open request's URL names
        self._request_url = self.url  # the last request's URL (per segment, the segment's), for the log
        self.header = header
        self.outbox = outbox
        self.metrics = metrics
        self.settings = settings
        self.lifecycle = Lifecycle(self.url, settings, plan)
        # One per process (it holds the TLS contexts); a publisher on its own makes its own.
        self.connector: Transport = connector or Connector(settings.send_timeout)
        # Shared by the publishers of one process: how many probes may be under way at once, so
        # that 4,000 publishers starting together do not overflow the server's SYN queue with 4,000
        # connects in the same millisecond (the ones dropped retry after 1, 3, 7 s: connect
        # timeouts and a slow start). The POST's own connect follows its probe.
        self.connect_slots = connect_slots
        # Shared too: one task that notices idle POSTs for all publishers (without one, each POST
        # runs a sweeper of its own).
        self.idle_sweeper = idle_sweeper
        labels = (stream_id, group, endpoint.name, endpoint.region)
        self.state = PublisherState(group, stream_id, endpoint.name, endpoint.region, since_wall=time.time())
        self.labels = labels
        headers = {"User-Agent": USER_AGENT, "X-Encoder-Group": group, **(extra_headers or {})}
        if authorization is not None:
            headers["Authorization"] = authorization  # never logged: the log lines name the endpoint
        self._headers = list(headers.items())
        # Signs each request over its whole body, so a request's body must be known when it starts:
        # a header alone or one segment (CMAF ingest), never a long POST fed as fragments come.
        if signer is not None and not (plan.per == "segment" and plan.header_alone):
            raise ValueError("request signing needs one request per segment with the header alone")
        self.signer = signer
        self._answer: Response | EndpointError | None = None  # what the server said (or did) during the request
        self._answered = trio.Event()
        self._backlog_shown: tuple[int, int] | None = None  # (fragments, bytes) last written
        self._kept: Connection | None = None  # per segment: the last request's connection, for the next one
        metrics.seconds_since_push.track(labels, self._seconds_since_push)
        # The labelled children, each looked up once, when first used (so a series appears when
        # it first has a value, as before): at thousands of pushes a second, prometheus-client's
        # label lookups were a visible share of the CPU.
        self._m = LabelledChildren(metrics, labels)

    def _log_fields(self) -> str:
        return f"group={self.group} stream={self.stream_id} endpoint={self.endpoint.name}"

    async def run(self) -> None:
        """Probe, then POST; on failure rewind the outbox, wait per the retry policy and start
        again, forever, until the outbox is closed and drained: each step is what the lifecycle
        says next.

        Cancellation: the POST in flight is abandoned (its connection closed without the final
        chunk), a kept connection is closed; fragments still queued are lost for this endpoint.
        For a clean end, close the outbox instead and let ``run`` return (which also closes a
        kept connection).
        """
        try:
            await self._run()
        finally:
            await self._close_kept()

    async def _run(self) -> None:
        machine = self.lifecycle
        action: Action = WAIT_FOR_WORK
        while True:
            if action is WAIT_FOR_WORK:
                if self._kept is None:
                    ready = await self.outbox.wait_for_work()
                else:  # until the kept connection expires: then close it, and wait on
                    assert machine.kept_until is not None
                    with trio.move_on_at(machine.kept_until) as waiting:
                        ready = await self.outbox.wait_for_work()
                    if waiting.cancelled_caught:
                        await self._close_kept()
                        action = machine.handle(EXPIRED, trio.current_time())
                        continue
                event: Event = WORK if ready else DRAINED
                action = machine.handle(event, trio.current_time())
            elif action is PROBE:
                if self.connect_slots is None:
                    event = await self._probe()
                else:
                    async with self.connect_slots:
                        event = await self._probe()
                action = machine.handle(event, trio.current_time())
            elif isinstance(action, Open):
                action = await self._request(action)
            elif isinstance(action, Completed):
                log.info("publisher.post.ended %s status=%d", self._log_fields(), action.status)
                action = WAIT_FOR_WORK
            elif isinstance(action, Rewind):
                self._record_failure(action.failure, action.error)
                self._rewind()
                self._update_backlog()
                action = machine.handle(Rewound(stopping=self.outbox.outbox.closed), trio.current_time())
            elif isinstance(action, BackOff):
                log.info("publisher.retry %s in_seconds=%.2f attempt=%d", self._log_fields(), action.delay,
                         action.attempt)  # fmt: skip
                self.state.retry_delay = action.delay
                await trio.sleep_until(action.until)
                action = machine.handle(BACKED_OFF, trio.current_time())
            elif action is ABANDON:
                log.warning("publisher.abandoned %s reason=stopping_while_endpoint_down fragments=%d",
                            self._log_fields(), len(self.outbox.outbox))  # fmt: skip
                return
            elif action is DONE:
                return
            else:  # pragma: no cover - the lifecycle gives no other action outside a request
                raise AssertionError(f"unexpected action {action!r}")

    def _rewind(self) -> None:
        again = self.outbox.outbox.rewind()
        if again:
            log.info("publisher.rewind %s resend=%d first_index=%d", self._log_fields(), len(again),
                     min(f.index for f in again))  # fmt: skip

    def _record_failure(self, failure: Failure, exc: EndpointError) -> None:
        # The status names the endpoint, not its URL (which a profile may make long or sensitive).
        self.state.record_failure(failure.value, str(exc).removeprefix(f"{exc.url}: "), time.time())
        self.metrics.post_failures.labels(*self.labels, failure.value).inc()
        fields = f"{self._log_fields()} status={exc.status_code} url={self._request_url}"
        if isinstance(exc, EndpointUnauthorized):
            hint = "check the endpoint's [credentials] (password_env / token_env)"
            if self.endpoint.sigv4 is not None:
                hint = (
                    f"check the endpoint's sigv4 keys ({self.endpoint.sigv4.where()}), region and service, "
                    "the IAM identity's permission to ingest, and this host's clock"
                )
            log.error("publisher.unauthorized %s hint=%s", fields, hint)
        elif isinstance(exc, EndpointNotFound):
            log.error("publisher.not_found %s hint=%s", fields,
                      "the publishing point does not exist; check the URL and that it is started")  # fmt: skip
        else:
            log.warning("publisher.post.failed %s reason=%s error=%s", fields, failure.value, exc)

    def _request_headers(self, close: bool = False) -> list[tuple[str, str]]:
        return [*self._headers, ("Connection", "close")] if close else self._headers

    async def _connect(self, target: Target | None = None) -> Connection:
        target = target or self.target
        connection = await self.connector.connect(target, self.endpoint.ca_file, within=self.lifecycle.connect_timeout)
        self._m.connections_opened.inc()  # made, not attempted: refusals are post_failures
        return connection

    async def _connection_for(self, opening: Open, target: Target) -> Connection:
        """The request's connection: the kept one if the lifecycle says ``reuse`` and it can carry
        the request, else a new one, once the kept one (if any) is closed: never two at once."""
        kept, self._kept = self._kept, None
        if kept is not None:
            if opening.reuse and kept.next_request(target):
                return kept
            await kept.aclose()
        return await self._connect(target)

    async def _close_kept(self) -> None:
        """Close the kept connection, if any. Cancellation: closes anyway."""
        kept, self._kept = self._kept, None
        if kept is not None:
            await kept.aclose()

    def _target_for_request(self) -> Target:
        """The next request's target: ``url`` unless segments have URLs of their own and the
        request carries a fragment (not the header alone), whose URL names the next fragment
        pending. Should the backlog's bound drop that fragment while the request connects, the
        fragment taken is not the one named, and the request fails before writing it (see
        _exchange): it goes back to the outbox and the next request names it."""
        self._planned = None
        if self.segment_url is None or (self.lifecycle.header_due and self.lifecycle.plan.header_alone):
            return self.target
        self._planned = self.outbox.outbox.peek()
        assert self._planned is not None  # a request opens only when a fragment is pending
        return Target.parse(self.segment_url(self._planned))

    async def _probe(self) -> Event:
        """The empty-body POST (spec 4, requirement 1): cheap, and fails fast on bad URLs and
        credentials before we start streaming. Sent with ``Connection: close``, so the POST that
        follows always opens a new connection. Returns what happened, as the lifecycle's event."""
        try:
            connection = await self._connect()
        except EndpointError as exc:
            return Failed(exc)
        try:
            await connection.send_head(self._request_headers(close=True), content_length=0,
                                       within=self.settings.send_timeout)  # fmt: skip
            await connection.end_body(within=self.settings.send_timeout)  # nothing to write: h11's state
            response: Response | None = None
            with trio.move_on_after(self.settings.response_timeout):
                response = await connection.receive_response()
        except EndpointError as exc:
            return Failed(exc)
        finally:
            await connection.aclose()
        if response is None:
            return TIMED_OUT
        if 200 <= response.status < 300:
            log.debug("publisher.probe.ok %s status=%d", self._log_fields(), response.status)
        return Answered(response.status, response.reason)

    async def _request(self, opening: Open) -> Action:
        """One request (a POST), from its connect to its answer; returns the lifecycle's first
        action after it (:class:`Completed` or :class:`Rewind`)."""
        machine = self.lifecycle
        header = await self.header.wait()
        version = self.header.version
        self.metrics.posts_opened.labels(*self.labels).inc()
        if opening.reconnect:
            self.state.reconnects += 1
            self.metrics.reconnects.labels(*self.labels).inc()
        self._answer = None
        self._answered = trio.Event()
        target = self._target_for_request()
        self._request_url = target.url
        log.info("publisher.post.started %s url=%s backlog=%d", self._log_fields(), target.url,
                 len(self.outbox.outbox))  # fmt: skip
        try:
            connection = await self._connection_for(opening, target)
        except EndpointError as exc:
            return machine.handle(Failed(exc), trio.current_time())
        # up shares one sweeper among its publishers; a publisher on its own runs one for itself.
        sweeper = self.idle_sweeper or IdleSweeper()
        action: Action | None = None
        try:
            action = machine.handle(OPENED, trio.current_time())
            sweeper.watch(self)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_answer, connection)
                if sweeper is not self.idle_sweeper:
                    nursery.start_soon(sweeper.run)
                action = await self._exchange(connection, header, version, action)
                nursery.cancel_scope.cancel()
        finally:
            sweeper.unwatch(self)
            if isinstance(action, Completed) and action.keep:
                self._kept = connection  # closed by the next request's _connection_for, or by run
            else:
                await connection.aclose()
            self._set_connected(False)
            self._update_backlog()
        assert action is not None
        return action

    async def _exchange(self, connection: Connection, header: StreamHeader, version: int, action: Action) -> Action:
        """Do what the lifecycle says while the request is open: the head and the stream header,
        then fragments as they come, each one chunk written within ``send_timeout`` (a fragment
        counts as pushed once its write completed), then the end of the body and the answer.

        The wait for the next fragment has no cancel scope: entering and leaving one with a
        deadline per fragment was a fifth of ``up``'s CPU at 4,000 POSTs (trio registers every
        deadline in a heap). What would cancel the wait wakes it instead: a pushed fragment, the
        outbox closing, the answer (:meth:`_read_answer`), the idle sweeper."""
        machine, outbox, timeout = self.lifecycle, self.outbox, self.settings.send_timeout
        box = outbox.outbox
        waited = False  # the last wait let other tasks run: the next write needs no checkpoint
        while True:
            try:
                if action is SEND_FRAGMENT:
                    item = box.take()
                    assert item is not None  # the lifecycle asks only after READY
                    if self._planned is not None and item.fragment is not self._planned:
                        raise EndpointError(self._request_url, f"fragment {self._planned.index} was dropped from "
                                            "the backlog before its request was sent; the next request names the next "
                                            "one")  # fmt: skip
                    self._update_backlog()
                    box.observe_unacked(connection.unacked_bytes())
                    await connection.send_chunk(item.fragment.data, timeout, checkpoint=not waited)
                    box.written()
                    self._on_pushed(item)
                    waited = False
                    action = machine.handle(WRITTEN_RESEND if item.resend else WRITTEN_NEW, trio.current_time())
                elif action is NEXT:
                    action = machine.handle(self._look(version), trio.current_time())
                elif isinstance(action, Wait):
                    await outbox.wait_for_change()
                    waited = True
                    action = machine.handle(self._look(version), trio.current_time())
                elif isinstance(action, SendHeader):
                    await connection.send_head(self._signed(header, action.with_header), content_length=None,
                                               within=timeout)  # fmt: skip
                    if action.with_header:
                        await connection.send_chunk(header.data, timeout)
                        self._m.bytes_pushed.inc(len(header.data))
                    self._set_connected(True)
                    action = machine.handle(HEADER_SENT, trio.current_time())
                elif isinstance(action, Finish):
                    if action.reason == "idle":
                        log.info("publisher.post.ending %s reason=idle seconds=%g", self._log_fields(),
                                 self.settings.idle_timeout)  # fmt: skip
                    elif action.reason == "header_changed":
                        log.info("publisher.post.ending %s reason=header_changed", self._log_fields())
                    self._update_backlog()
                    await connection.end_body(timeout)
                    with trio.move_on_after(action.within):
                        await self._answered.wait()
                    final = self._answer_event(connection) or TIMED_OUT
                    action = machine.handle(final, trio.current_time())
                else:
                    return action  # the request is over: Completed or Rewind
            except EndpointError as exc:
                # An answer during the body (a refusal) says more than the write error it caused.
                answer = self._answer
                if not isinstance(answer, Response):
                    event: Event = Failed(exc)
                elif isinstance(action, Finish):  # it came before the end of the body was written
                    event = Failed(answered_mid_body(self.url, answer.status, answer.reason))
                else:
                    event = Answered(answer.status, answer.reason)
                action = machine.handle(event, trio.current_time())

    def _signed(self, header: StreamHeader, with_header: bool) -> list[tuple[str, str]]:
        """The request's headers, and with a signer the signature over the body the request will
        carry: the header alone, or the one segment its URL names (never logged)."""
        headers = self._request_headers()
        if self.signer is None:
            return headers
        if with_header:
            body = header.data
        else:
            assert self._planned is not None  # per segment, a request opens for a pending fragment
            body = self._planned.data
        return [*headers, *self.signer(METHOD, self._request_url, body)]

    def _look(self, version: int) -> Event:
        """What the open request has to do now, as the lifecycle's event."""
        if self._answered.is_set():
            event = self._answer_event()
            assert event is not None
            return event
        if self.header.version != version:
            return HEADER_CHANGED
        box = self.outbox.outbox
        if len(box):
            return READY
        self._update_backlog()
        return DRAINED if box.finished else EMPTY

    def _answer_event(self, connection: Connection | None = None) -> Event | None:
        """The answer as the lifecycle's event; after the body, with whether ``connection`` can
        carry another request."""
        answer = self._answer
        if isinstance(answer, Response):
            return Answered(answer.status, answer.reason, connection is not None and connection.reusable())
        if isinstance(answer, EndpointError):
            return Failed(answer)
        return None

    async def _read_answer(self, connection: Connection) -> None:
        """For the life of the POST, read what the server sends: its response, normally after the
        last chunk; a response or the connection closing *during* the body means the POST is
        over, so the wait for the next fragment, if one is in progress, is woken (and the
        next one does not start) instead of finding out up to a fragment duration later, when
        the next write fails. Works over TLS too (the reader sees the decrypted stream).

        Cancellation: returns; nothing to clean up (the POST closes the connection)."""
        try:
            self._answer = await connection.receive_response()
        except EndpointError as exc:
            self._answer = exc
        self._answered.set()
        self.outbox.wake()

    def _on_pushed(self, item: Taken) -> None:
        fragment, m = item.fragment, self._m
        if item.resend:
            m.resent_fragments.inc()
        m.fragments_pushed.inc()
        m.bytes_pushed.inc(len(fragment.data))
        m.last_pushed_index.set(fragment.index)
        m.last_pushed_timestamp.set(fragment.start / fragment.timescale)
        m.last_push_time.set(time.time())
        self.state.record_push(fragment.index, item.resend, trio.current_time())

    def _seconds_since_push(self) -> float | None:
        last = self.state.last_push_monotonic
        try:
            return None if last is None else trio.current_time() - last
        except RuntimeError:  # scraped outside trio (a test reading the registry afterwards)
            return None

    def _update_backlog(self) -> None:
        """Backlog gauges and state. Called for every fragment taken; in steady state the backlog
        is empty every time, which is written once, not 4,000 times a second."""
        outbox = self.outbox.outbox
        shown = (len(outbox), outbox.pending_bytes)
        if shown == self._backlog_shown == (0, 0):
            return
        self._backlog_shown = shown
        seconds, m = float(outbox.pending_seconds), self._m
        m.backlog_fragments.set(shown[0])
        m.backlog_bytes.set(shown[1])
        m.backlog_seconds.set(seconds)
        self.state.set_backlog(shown[0], shown[1], seconds)

    def _set_connected(self, connected: bool) -> None:
        self.state.set_connected(connected, time.time())
        self._m.endpoint_up.set(1 if connected else 0)


class IdleSweeper:
    """Notices, for every publisher of a process, a POST idle for its ``idle_timeout``, and wakes
    its wait for the next fragment (which then ends the POST).

    One task for all: a timer per POST would expire and re-arm every idle period (thousands a
    second at 4,000 POSTs; trio turns every expired deadline into a ``Cancelled`` raised and
    caught). The sweep looks at the watched publishers every ``interval`` seconds, so a POST
    ends up to ``interval`` after its idle timeout (which the spec only asks to be commensurate
    with the fragment duration)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._watched: set[Publisher] = set()

    def watch(self, publisher: Publisher) -> None:
        self._watched.add(publisher)

    def unwatch(self, publisher: Publisher) -> None:
        self._watched.discard(publisher)

    async def run(self) -> None:
        """Sweep until cancelled. Cancellation: stops; the POSTs then no longer end when idle."""
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            for publisher in self._watched:
                if now >= publisher.lifecycle.idle_at:
                    publisher.outbox.wake()


def auth_for(endpoint: Endpoint) -> str | None:
    """The ``Authorization`` header value for an endpoint's credentials (Basic or Bearer), read
    from the environment or a file now.

    Raises ValueError naming the variable or file (never the secret) if it is missing.
    """
    if endpoint.credentials is None:
        return None
    secret = endpoint.credentials.authorization()
    if isinstance(secret, tuple):
        user, password = secret
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Bearer {secret}"
