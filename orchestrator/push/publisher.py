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

httpx errors are converted to :mod:`orchestrator.errors` types at this boundary.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import struct
import termios
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio

from orchestrator.errors import (
    EndpointError,
    EndpointNotFound,
    EndpointRejected,
    EndpointUnauthorized,
    reason_of,
)
from orchestrator.fmp4.stream import StreamHeader
from orchestrator.ops.metrics import Metrics
from orchestrator.ops.state import PublisherState
from orchestrator.profile import Endpoint
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
        client: httpx.AsyncClient,
        group: str,
        stream_id: str,
        endpoint: Endpoint,
        header: HeaderBoard,
        outbox: EndpointOutbox,
        metrics: Metrics,
        settings: PublisherSettings,
        auth: httpx.Auth | None = None,
        extra_headers: dict[str, str] | None = None,
        connect_slots: trio.CapacityLimiter | None = None,
    ) -> None:
        self.client = client
        self.group = group
        self.stream_id = stream_id
        self.endpoint = endpoint
        self.url = endpoint.stream_url(stream_id)
        self.header = header
        self.outbox = outbox
        self.metrics = metrics
        self.settings = settings
        self.auth = auth
        # Shared by the publishers of one process: how many probes may be under way at once, so
        # that 4,000 publishers starting together do not overflow the server's SYN queue with 4,000
        # connects in the same millisecond (the ones dropped retry after 1, 3, 7 s: connect
        # timeouts and a slow start). The POST's own connect follows its probe.
        self.connect_slots = connect_slots
        labels = (stream_id, group, endpoint.name, endpoint.region)
        self.state = PublisherState(group, stream_id, endpoint.name, endpoint.region, since_wall=time.time())
        self.labels = labels
        self._headers = {"User-Agent": USER_AGENT, "X-Encoder-Group": group, **(extra_headers or {})}
        self._timeout = httpx.Timeout(
            connect=settings.connect_timeout, write=settings.send_timeout,
            read=settings.response_timeout, pool=settings.connect_timeout)  # fmt: skip
        self._failed_since_last_post = False
        self._new_in_post = 0  # fragments sent for the first time on the current POST
        self._post_socket: Any = None  # the open POST's socket (trio), to notice a dead idle connection
        self._socket_known = trio.Event()
        self._peer_closed = False  # the POST's connection became readable: the peer closed it or answered
        self._take_scope: trio.CancelScope | None = None  # the wait for the next fragment, if one is in progress
        metrics.seconds_since_push.track(labels, self._seconds_since_push)
        # The labelled children, each looked up once, when first used (so a series appears when
        # it first has a value, as before): at thousands of pushes a second, prometheus-client's
        # label lookups were a visible share of the CPU.
        self._m = _LabelledChildren(metrics, labels)

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

    async def _probe(self) -> None:
        """The empty-body POST (spec 4, requirement 1): cheap, and fails fast on bad URLs and
        credentials before we start streaming."""
        response = await self._request(content=b"", close=True)
        _raise_for_status(self.url, response)
        log.debug("publisher.probe.ok %s status=%d", self._log_fields(), response.status_code)

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
        self._post_socket = None
        self._socket_known = trio.Event()
        self._peer_closed = False
        failed: EndpointError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_post)
            try:
                response = await self._request(content=self._body(header, self.header.version))
            except EndpointError as exc:
                failed = exc  # raised below, outside the nursery (which would wrap it in a group)
            nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        _raise_for_status(self.url, response)
        log.info("publisher.post.ended %s status=%d", self._log_fields(), response.status_code)

    async def _request(self, content: bytes | AsyncGenerator[bytes], close: bool = False) -> httpx.Response:
        headers = {**self._headers, "Connection": "close"} if close else self._headers
        request = self.client.build_request("POST", self.url, content=content, headers=headers,
                                            timeout=self._timeout, extensions={"trace": self._trace})  # fmt: skip
        if not isinstance(content, bytes):
            request.stream = _ChunkedBody(content)  # so that we, not the garbage collector, close it
        try:
            return await self.client.send(request, auth=self.auth or httpx.USE_CLIENT_DEFAULT)
        except httpx.TimeoutException as exc:
            raise EndpointError(self.url, f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise EndpointError(self.url, f"connection failed: {type(exc).__name__}: {reason_of(exc)}") from exc
        finally:
            if not isinstance(content, bytes):
                await content.aclose()

    async def _body(self, header: StreamHeader, header_version: int) -> AsyncGenerator[bytes]:
        """The POST body. httpx asks for the next chunk only once the previous one is written,
        so a fragment counts as pushed when the generator resumes after yielding it."""
        yield header.data
        self._m.bytes_pushed.inc(len(header.data))
        self._set_connected(True)
        while True:
            if self.header.version != header_version:
                log.info("publisher.post.ending %s reason=header_changed", self._log_fields())
                return
            item = await self._next_fragment()
            self._update_backlog()
            if item is None:
                return
            if item == "idle":
                log.info("publisher.post.ending %s reason=idle seconds=%g", self._log_fields(),
                         self.settings.idle_timeout)  # fmt: skip
                return
            if self._post_socket is not None:
                self.outbox.outbox.observe_unacked(_unacked_bytes(self._post_socket))
            yield item.fragment.data
            self.outbox.outbox.written()
            self._on_pushed(item)

    async def _next_fragment(self) -> Taken | Literal["idle"] | None:
        """The next fragment for the open POST, unless :meth:`_watch_post` saw the peer close the
        connection: then the POST ends at once, instead of when the next fragment is written into
        a dead connection, up to a fragment duration later."""
        if self._peer_closed:
            raise EndpointError(self.url, "the server closed the connection while the POST was waiting for a fragment")
        with trio.CancelScope() as self._take_scope:
            return await self.outbox.take(self.settings.idle_timeout)
        raise EndpointError(self.url, "the server closed the connection while the POST was waiting for a fragment")

    async def _watch_post(self) -> None:
        """For the life of the POST, watch its connection: a plain-HTTP peer that closes or resets
        it (or answers before the body ends) makes the socket readable. Then the wait for the next
        fragment, if one is in progress, is cancelled (and the next one does not start). (Over
        TLS, bytes may arrive that are not an answer, such as session tickets, so there the next
        write finds out.) One wait per POST, not one per fragment: registering the socket with
        the event loop for every fragment was a fifth of ``up``'s CPU at 300 streams.

        Cancellation: returns; nothing to clean up (the POST's nursery cancels it when the
        request ends)."""
        if self.endpoint.url.startswith("https:"):
            return
        await self._socket_known.wait()
        # A duplicate descriptor of the socket: httpx waits on the socket itself to read the
        # response, and trio allows one reader per descriptor.
        fd = os.dup(self._post_socket.fileno())
        try:
            await trio.lowlevel.wait_readable(fd)
            self._peer_closed = True
            if self._take_scope is not None:
                self._take_scope.cancel()
        finally:
            os.close(fd)  # the wait is over (or was aborted by the cancellation): nothing waits on fd

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: keeps the socket of the connection the POST just opened."""
        if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
            self._post_socket = info["return_value"].get_extra_info("socket")
            self._socket_known.set()

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
        outbox, m = self.outbox.outbox, self._m
        m.backlog_fragments.set(len(outbox))
        m.backlog_bytes.set(outbox.pending_bytes)
        m.backlog_seconds.set(float(outbox.pending_seconds))
        self.state.set_backlog(len(outbox), outbox.pending_bytes, float(outbox.pending_seconds))

    def _set_connected(self, connected: bool) -> None:
        self.state.set_connected(connected, time.time())
        self._m.endpoint_up.set(1 if connected else 0)


class _LabelledChildren:
    """``children.bytes_pushed`` is ``metrics.bytes_pushed.labels(*labels)``, looked up once."""

    def __init__(self, metrics: Metrics, labels: tuple[str, ...]) -> None:
        self._metrics = metrics
        self._labels = labels

    def __getattr__(self, name: str) -> Any:
        child = getattr(self._metrics, name).labels(*self._labels)
        setattr(self, name, child)  # found as an attribute from now on; __getattr__ is not called again
        return child


class _ChunkedBody(httpx.AsyncByteStream):
    """A request body that hands httpx our generator itself. (Given a generator as ``content``,
    httpx wraps it in one of its own, which is left unfinished when a POST breaks mid-body and
    then finalised by the garbage collector; this way the publisher closes its own.)"""

    def __init__(self, chunks: AsyncGenerator[bytes]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()


def _unacked_bytes(sock: Any) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (Linux ``SIOCOUTQ``, the
    same ioctl number as ``TIOCOUTQ``); 0 where unsupported or once the socket is gone."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return 0


def _raise_for_status(url: str, response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    reason = f"HTTP {status} {response.reason_phrase}".strip()
    if status in (401, 403):
        raise EndpointUnauthorized(url, f"{reason}: credentials missing or refused", status)
    if status == 404:
        raise EndpointNotFound(url, f"{reason}: publishing point not found", status)
    raise EndpointRejected(url, reason, status)


def auth_for(endpoint: Endpoint) -> httpx.Auth | None:
    """httpx auth for an endpoint's credentials, read from the environment or a file now.

    Raises ValueError naming the variable or file (never the secret) if it is missing.
    """
    if endpoint.credentials is None:
        return None
    secret = endpoint.credentials.authorization()
    if isinstance(secret, tuple):
        return httpx.BasicAuth(*secret)
    return _BearerAuth(secret)


class _BearerAuth(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def __repr__(self) -> str:  # never print the token
        return "<BearerAuth>"
