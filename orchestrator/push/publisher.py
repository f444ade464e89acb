"""Publisher: pushes one stream to one ingest endpoint over a long-running chunked HTTP POST,
and never gives up on it.

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

HTTP is :mod:`orchestrator.push.connection` (h11 over trio streams, one connection per request);
its failures arrive as :mod:`orchestrator.errors` types.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import random
import struct
import termios
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from orchestrator.errors import (
    EndpointError,
    EndpointNotFound,
    EndpointRejected,
    EndpointUnauthorized,
)
from orchestrator.fmp4.stream import StreamHeader
from orchestrator.ops.metrics import LabelledChildren, Metrics
from orchestrator.ops.state import PublisherState
from orchestrator.profile import Endpoint
from orchestrator.push.connection import Connector, HttpConnection, Response, Target
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.outbox import Taken
from orchestrator.push.reconnect import Failure, RetryPolicy, classify_status

log = logging.getLogger(__name__)

USER_AGENT = "orchestrator"


@dataclass(frozen=True)
class PublisherSettings:
    connect_timeout: float = 10.0  # spec 7.1
    send_timeout: float = 4.0  # spec 7.2: between N and 2N for N-second fragments
    response_timeout: float = 10.0  # waiting for the final response after the last chunk
    idle_timeout: float = 8.0  # end a POST with nothing to send (spec 7.6)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def for_fragment_duration(cls, seconds: float, **overrides: Any) -> PublisherSettings:
        settings = {"send_timeout": max(2.0, 1.5 * seconds), "idle_timeout": 3.0 * seconds, **overrides}
        return cls(**settings)


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
        connector: Connector | None = None,
        authorization: str | None = None,
        extra_headers: dict[str, str] | None = None,
        connect_slots: trio.CapacityLimiter | None = None,
        idle_sweeper: IdleSweeper | None = None,
    ) -> None:
        self.group = group
        self.stream_id = stream_id
        self.endpoint = endpoint
        self.url = endpoint.stream_url(stream_id)
        self.target = Target.parse(self.url)
        self.header = header
        self.outbox = outbox
        self.metrics = metrics
        self.settings = settings
        # One per process (it holds the TLS contexts); a publisher on its own makes its own.
        self.connector = connector or Connector(settings.send_timeout)
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
        self._failed_since_last_post = False
        self._new_in_post = 0  # fragments sent for the first time on the current POST
        self._answer: Response | EndpointError | None = None  # what the server said (or did) during the POST
        self._answered = trio.Event()
        self._backlog_shown: tuple[int, int] | None = None  # (fragments, bytes) last written
        self._waited = False  # the last _next_fragment waited (other tasks ran meanwhile)
        self._idle_at = 0.0  # trio time at which the open POST has been idle for idle_timeout
        metrics.seconds_since_push.track(labels, self._seconds_since_push)
        # The labelled children, each looked up once, when first used (so a series appears when
        # it first has a value, as before): at thousands of pushes a second, prometheus-client's
        # label lookups were a visible share of the CPU.
        self._m = LabelledChildren(metrics, labels)

    def _log_fields(self) -> str:
        return f"group={self.group} stream={self.stream_id} endpoint={self.endpoint.name}"

    async def run(self) -> None:
        """Probe, then POST; on failure rewind the outbox, wait per the retry policy and start
        again, forever, until the outbox is closed and drained.

        Cancellation: the POST in flight is abandoned (its connection closed without the final
        chunk); fragments still queued are lost for this endpoint. For a clean end, close the
        outbox instead and let ``run`` return.
        """
        consecutive_failures = 0
        while await self.outbox.wait_for_work():
            self._new_in_post = 0
            try:
                if self.connect_slots is None:
                    await self._probe()
                else:
                    async with self.connect_slots:
                        await self._probe()
                await self._post()
                consecutive_failures = 0
            except EndpointError as exc:
                # A POST that carried new fragments was a working connection: retry at once.
                consecutive_failures = 1 if self._new_in_post else consecutive_failures + 1
                failure = classify_status(exc.status_code) if exc.status_code else Failure.TRANSPORT
                self._record_failure(failure, exc)
                self._rewind()
                if self.outbox.outbox.closed and consecutive_failures > 2:
                    log.warning("publisher.abandoned %s reason=stopping_while_endpoint_down fragments=%d",
                                self._log_fields(), len(self.outbox.outbox))  # fmt: skip
                    return
                delay = self.settings.retry.delay(consecutive_failures, failure, random.random())
                log.info("publisher.retry %s in_seconds=%.2f attempt=%d", self._log_fields(), delay,
                         consecutive_failures)  # fmt: skip
                self.state.retry_delay = delay
                await trio.sleep(delay)
            finally:
                self._set_connected(False)
                self._update_backlog()

    def _rewind(self) -> None:
        again = self.outbox.outbox.rewind()
        self._failed_since_last_post = True
        if again:
            log.info("publisher.rewind %s resend=%d first_index=%d", self._log_fields(), len(again),
                     min(f.index for f in again))  # fmt: skip

    def _record_failure(self, failure: Failure, exc: EndpointError) -> None:
        # The status names the endpoint, not its URL (which a profile may make long or sensitive).
        self.state.record_failure(failure.value, str(exc).removeprefix(f"{exc.url}: "), time.time())
        self.metrics.post_failures.labels(*self.labels, failure.value).inc()
        fields = f"{self._log_fields()} status={exc.status_code} url={self.url}"
        if isinstance(exc, EndpointUnauthorized):
            log.error("publisher.unauthorized %s hint=%s", fields,
                      "check the endpoint's [credentials] (password_env / token_env)")  # fmt: skip
        elif isinstance(exc, EndpointNotFound):
            log.error("publisher.not_found %s hint=%s", fields,
                      "the publishing point does not exist; check the URL and that it is started")  # fmt: skip
        else:
            log.warning("publisher.post.failed %s reason=%s error=%s", fields, failure.value, exc)

    def _request_headers(self, close: bool = False) -> list[tuple[str, str]]:
        return [*self._headers, ("Connection", "close")] if close else self._headers

    async def _connect(self) -> HttpConnection:
        return await self.connector.connect(self.target, self.endpoint.ca_file, within=self.settings.connect_timeout)

    async def _probe(self) -> None:
        """The empty-body POST (spec 4, requirement 1): cheap, and fails fast on bad URLs and
        credentials before we start streaming. Sent with ``Connection: close``, so the POST that
        follows always opens a new connection."""
        connection = await self._connect()
        try:
            await connection.send_head(self._request_headers(close=True), content_length=0,
                                       within=self.settings.send_timeout)  # fmt: skip
            await connection.end_body(within=self.settings.send_timeout)  # nothing to write: h11's state
            response: Response | None = None
            with trio.move_on_after(self.settings.response_timeout):
                response = await connection.receive_response()
            if response is None:
                raise EndpointError(self.url, f"timed out (response, {self.settings.response_timeout:g} s)")
        finally:
            await connection.aclose()
        _raise_for_status(self.url, response)
        log.debug("publisher.probe.ok %s status=%d", self._log_fields(), response.status)

    async def _post(self) -> None:
        header = await self.header.wait()
        self.metrics.posts_opened.labels(*self.labels).inc()
        if self._failed_since_last_post:
            self._failed_since_last_post = False
            self.state.reconnects += 1
            self.metrics.reconnects.labels(*self.labels).inc()
        log.info("publisher.post.started %s url=%s backlog=%d", self._log_fields(), self.url,
                 len(self.outbox.outbox))  # fmt: skip
        self._new_in_post = 0
        self._answer = None
        self._answered = trio.Event()
        connection = await self._connect()
        failed: EndpointError | None = None
        # up shares one sweeper among its publishers; a publisher on its own runs one for itself.
        sweeper = self.idle_sweeper or IdleSweeper()
        try:
            self._idle_at = trio.current_time() + self.settings.idle_timeout
            sweeper.watch(self)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_answer, connection)
                if sweeper is not self.idle_sweeper:
                    nursery.start_soon(sweeper.run)
                try:
                    await self._send_body(connection, header, self.header.version)
                except EndpointError as exc:
                    failed = exc  # raised below, outside the nursery (which would wrap it in a group)
                if failed is None:
                    with trio.move_on_after(self.settings.response_timeout):
                        await self._answered.wait()
                nursery.cancel_scope.cancel()
        finally:
            sweeper.unwatch(self)
            await connection.aclose()
        answer = self._answer
        if isinstance(answer, Response):
            # An answer during the body (a refusal) says more than the write error it caused.
            _raise_for_status(self.url, answer)
            if failed is not None:
                raise EndpointRejected(self.url, f"the server answered HTTP {answer.status} before the body ended",
                                       answer.status)  # fmt: skip
        elif failed is not None:
            raise failed
        elif isinstance(answer, EndpointError):
            raise answer
        else:
            raise EndpointError(self.url, f"timed out (response, {self.settings.response_timeout:g} s)")
        log.info("publisher.post.ended %s status=%d", self._log_fields(), answer.status)

    async def _read_answer(self, connection: HttpConnection) -> None:
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

    async def _send_body(self, connection: HttpConnection, header: StreamHeader, header_version: int) -> None:
        """The POST: head, the stream header, then fragments as they come, each one chunk
        written within ``send_timeout``; a fragment counts as pushed once its write completed."""
        timeout = self.settings.send_timeout
        await connection.send_head(self._request_headers(), content_length=None, within=timeout)
        await connection.send_chunk(header.data, timeout)
        self._m.bytes_pushed.inc(len(header.data))
        self._set_connected(True)
        while True:
            if self.header.version != header_version:
                log.info("publisher.post.ending %s reason=header_changed", self._log_fields())
                break
            self._waited = False
            item = await self._next_fragment()
            self._update_backlog()
            if item is None:
                break
            if item == "idle":
                log.info("publisher.post.ending %s reason=idle seconds=%g", self._log_fields(),
                         self.settings.idle_timeout)  # fmt: skip
                break
            self.outbox.outbox.observe_unacked(_unacked_bytes(connection.socket))
            await connection.send_chunk(item.fragment.data, timeout, checkpoint=not self._waited)
            self.outbox.outbox.written()
            self._on_pushed(item)
        await connection.end_body(timeout)

    async def _next_fragment(self) -> Taken | Literal["idle"] | None:
        """The next fragment for the open POST; None once the outbox is closed and drained;
        "idle" once ``idle_timeout`` passed with nothing to send (see :class:`IdleSweeper`). An
        EndpointError if :meth:`_read_answer` saw the server answer or close the connection:
        then the POST ends at once.

        This runs for every fragment, so it waits without a cancel scope: entering and leaving
        one with a deadline per fragment was a fifth of ``up``'s CPU at 4,000 POSTs (trio
        registers every deadline in a heap). What would cancel the wait wakes it instead."""
        outbox = self.outbox
        while True:
            if self._answered.is_set():
                raise EndpointError(self.url, "the server answered or closed the connection while the POST was "
                                              "waiting for a fragment")  # fmt: skip
            if len(outbox.outbox):
                self._idle_at = trio.current_time() + self.settings.idle_timeout
                return outbox.outbox.take()
            if outbox.outbox.finished:
                return None
            if trio.current_time() >= self._idle_at:
                return "idle"
            await outbox.wait_for_change()
            self._waited = True

    def _on_pushed(self, item: Taken) -> None:
        fragment, m = item.fragment, self._m
        if item.resend:
            m.resent_fragments.inc()
        else:
            self._new_in_post += 1
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
                if now >= publisher._idle_at:
                    publisher.outbox.wake()


def _unacked_bytes(sock: Any) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (Linux ``SIOCOUTQ``, the
    same ioctl number as ``TIOCOUTQ``); 0 where unsupported or once the socket is gone."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return 0


def _raise_for_status(url: str, response: Response) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"HTTP {status} {response.reason}".strip()
    if status in (401, 403):
        raise EndpointUnauthorized(url, f"{reason}: credentials missing or refused", status)
    if status == 404:
        raise EndpointNotFound(url, f"{reason}: publishing point not found", status)
    raise EndpointRejected(url, reason, status)


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
