"""Publisher: pushes one stream to one ingest endpoint over a long-running chunked HTTP POST.

One :class:`Publisher` task runs per (group, stream, endpoint). It follows the ingest spec,
section 4:

1. an empty-body POST to ``<publishing point>/Streams(<id>)`` probes the endpoint; a 401/403/404
   is a named error (:class:`EndpointUnauthorized`, :class:`EndpointNotFound`), logged plainly;
2. a long-running POST with chunked transfer encoding whose body is the stream header (ftyp,
   Live Server Manifest, moov) followed by fragments taken from this endpoint's own
   :class:`EndpointQueue`, as the encoder produces them;
3. when the stream ends (shutdown), the body is finished (the zero-length chunk) and the final
   response awaited.

Any failure ends the POST; the publisher waits as :class:`~orchestrator.reconnect.RetryPolicy`
says and starts again with a new probe and a new POST that begins with the identical header.
Resending the last fragments after a reconnect (the forward buffer) is the seam ``_on_reconnect``
marks; this version resumes with whatever is queued.

httpx errors are converted to :mod:`orchestrator.errors` types at this boundary.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import trio

from orchestrator.backlog import Backlog
from orchestrator.errors import (
    EndpointError,
    EndpointNotFound,
    EndpointRejected,
    EndpointUnauthorized,
)
from orchestrator.metrics import Metrics
from orchestrator.profile import Endpoint
from orchestrator.reconnect import Failure, RetryPolicy, classify_status
from orchestrator.stream import EncodedFragment, StreamHeader

log = logging.getLogger(__name__)

USER_AGENT = "orchestrator"


class EndpointQueue:
    """A :class:`Backlog` with a trio wake-up: the encoder puts without ever waiting, the
    publisher waits for the next fragment."""

    def __init__(self, max_fragments: int) -> None:
        self.backlog = Backlog(max_fragments)
        self._changed = trio.Event()

    def put_nowait(self, fragment: EncodedFragment) -> list[EncodedFragment]:
        dropped = self.backlog.push(fragment)
        self._changed.set()
        return dropped

    def close(self) -> None:
        self.backlog.close()
        self._changed.set()

    async def get(self) -> EncodedFragment | None:
        """The next fragment, or None once the queue is closed and drained."""
        while True:
            fragment = self.backlog.pop()
            if fragment is not None:
                return fragment
            if self.backlog.finished:
                return None
            self._changed = trio.Event()
            await self._changed.wait()

    def __len__(self) -> int:
        return len(self.backlog)


@dataclass
class PublisherState:
    """What the status view shows for one publisher."""

    group: str
    stream_id: str
    endpoint: str
    connected: bool = False
    last_index: int | None = None
    last_push_monotonic: float | None = None
    failures: int = 0
    last_error: str | None = None
    fragments_pushed: int = 0


@dataclass(frozen=True)
class PublisherSettings:
    connect_timeout: float = 10.0  # spec 7.1
    send_timeout: float = 4.0  # spec 7.2: between N and 2N for N-second fragments
    response_timeout: float = 10.0  # waiting for the final response after the last chunk
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def for_fragment_duration(cls, seconds: float) -> PublisherSettings:
        return cls(send_timeout=max(2.0, 1.5 * seconds))


class Publisher:
    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        group: str,
        stream_id: str,
        endpoint: Endpoint,
        header: StreamHeader,
        queue: EndpointQueue,
        metrics: Metrics,
        settings: PublisherSettings,
        auth: httpx.Auth | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.group = group
        self.stream_id = stream_id
        self.endpoint = endpoint
        self.url = endpoint.stream_url(stream_id)
        self.header = header
        self.queue = queue
        self.metrics = metrics
        self.settings = settings
        self.auth = auth
        labels = (stream_id, group, endpoint.name, endpoint.region)
        self.state = PublisherState(group, stream_id, endpoint.name)
        self._labels = labels
        self._headers = {"User-Agent": USER_AGENT, "X-Encoder-Group": group, **(extra_headers or {})}
        self._timeout = httpx.Timeout(
            connect=settings.connect_timeout, write=settings.send_timeout,
            read=settings.response_timeout, pool=settings.connect_timeout)  # fmt: skip

    def _log_fields(self) -> str:
        return f"group={self.group} stream={self.stream_id} endpoint={self.endpoint.name}"

    async def run(self) -> None:
        """Probe, then POST; on failure wait per the retry policy and start again, until the
        queue is closed and drained.

        Cancellation: the POST in flight is abandoned (its connection closed without the final
        chunk); fragments still queued are lost for this endpoint. For a clean end, close the
        queue instead and let ``run`` return.
        """
        consecutive_failures = 0
        while not self.queue.backlog.finished:
            try:
                await self._probe()
                await self._post()
                consecutive_failures = 0
            except EndpointError as exc:
                consecutive_failures += 1
                failure = classify_status(exc.status_code) if exc.status_code else Failure.TRANSPORT
                self._record_failure(failure, exc)
                if self.queue.backlog.closed:
                    log.warning("publisher.abandoned %s reason=stopping_while_endpoint_down fragments=%d",
                                self._log_fields(), len(self.queue))  # fmt: skip
                    break
                await trio.sleep(self.settings.retry.delay(consecutive_failures, failure, random.random()))
            finally:
                self._set_connected(False)

    def _record_failure(self, failure: Failure, exc: EndpointError) -> None:
        self.state.failures += 1
        self.state.last_error = str(exc)
        self.metrics.post_failures.labels(*self._labels, failure.value).inc()
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
        response = await self._request(content=b"")
        _raise_for_status(self.url, response)
        log.debug("publisher.probe.ok %s status=%d", self._log_fields(), response.status_code)

    async def _post(self) -> None:
        self.metrics.posts_opened.labels(*self._labels).inc()
        log.info("publisher.post.started %s url=%s", self._log_fields(), self.url)
        response = await self._request(content=self._body())
        _raise_for_status(self.url, response)
        log.info("publisher.post.ended %s status=%d", self._log_fields(), response.status_code)

    async def _request(self, content: bytes | AsyncIterator[bytes]) -> httpx.Response:
        try:
            return await self.client.post(
                self.url, content=content, headers=self._headers, auth=self.auth or httpx.USE_CLIENT_DEFAULT,
                timeout=self._timeout)  # fmt: skip
        except httpx.TimeoutException as exc:
            raise EndpointError(self.url, f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise EndpointError(self.url, f"connection failed: {type(exc).__name__}: {exc}") from exc

    async def _body(self) -> AsyncIterator[bytes]:
        """The POST body. httpx asks for the next chunk only once the previous one is written,
        so a fragment counts as pushed when the generator resumes after yielding it."""
        yield self.header.data
        self.metrics.bytes_pushed.labels(*self._labels).inc(len(self.header.data))
        self._set_connected(True)
        while True:
            fragment = await self.queue.get()
            self.metrics.queue_depth.labels(*self._labels).set(len(self.queue))
            if fragment is None:
                return
            yield fragment.data
            self._on_pushed(fragment)

    def _on_pushed(self, fragment: EncodedFragment) -> None:
        labels = self._labels
        self.metrics.fragments_pushed.labels(*labels).inc()
        self.metrics.bytes_pushed.labels(*labels).inc(len(fragment.data))
        self.metrics.last_pushed_index.labels(*labels).set(fragment.index)
        self.metrics.last_pushed_timestamp.labels(*labels).set(fragment.start / fragment.timescale)
        self.metrics.last_push_time.labels(*labels).set(time.time())
        self.state.last_index = fragment.index
        self.state.last_push_monotonic = trio.current_time()
        self.state.fragments_pushed += 1

    def _set_connected(self, connected: bool) -> None:
        self.state.connected = connected
        self.metrics.endpoint_up.labels(*self._labels).set(1 if connected else 0)


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
