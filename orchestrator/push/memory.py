"""An in-memory endpoint behind the :class:`~orchestrator.push.transport.Transport` seam, on trio's
clock, for tests that need no real peer (the loopback tests prove the real thing).

Theory of operation
-------------------
:class:`MemoryEndpoint` is both the transport (``connect``) and the endpoint: every request it
receives is recorded as a :class:`MemoryRequest` (headers, body chunks, whether the body ended,
what it answered), and what it does is scripted by its attributes, which a test may change at
any moment:

* ``status``: the answer to requests that start from now on. A probe (a ``Content-Length``
  body) is answered after its body; a chunked request is answered at once if the status is not
  2xx (a refusal, which the publisher reads during the body), else after its body;
* ``silent``: requests that end from now on get no answer (a hung server);
* ``refuse``: connects fail (connection refused), after ``connect_delay`` seconds;
* ``read_rate`` / ``buffer``: the receiver reads ``read_rate`` bytes a second (None: at once;
  0: never, a stall) and up to ``buffer`` bytes wait unread (the socket buffers): a write
  completes when what does not fit has been read, or fails at its deadline (``within``);
* ``close_after``: each new connection dies (a reset) once its body reached that many bytes;
  the write that crosses the line fails and the bytes beyond it are lost;
* ``answer_after``: (bytes, status): the endpoint answers ``status`` once the body of the next
  chunked request reached that many bytes, and keeps the connection open (a refusal
  mid-stream); once: it is then cleared;
* :meth:`MemoryEndpoint.reset`: every open connection dies now;
* ``keep_alive``: a connection whose request was answered can carry the next one (HTTP/1.1
  keep-alive; False, the default: the endpoint answers as if with ``Connection: close``), and
  ``close_after`` counts each request's body; :meth:`MemoryEndpoint.close_idle` closes every
  connection that waits between requests, as a server's keep-alive timeout does.
  ``most_open`` is the most connections open at once; each request names its connection (the
  number of the connect that made it).

Bytes count as received once written (the buffer is the receiver's). Time is trio's clock, so
on the autojump clock a 10-second deadline passes at once and exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from orchestrator.errors import EndpointError
from orchestrator.push.failures import timed_out
from orchestrator.push.transport import Response, Target

REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 503: "Service Unavailable"}


@dataclass(eq=False)
class MemoryRequest:
    """One request as the endpoint saw it."""

    path: bytes
    headers: dict[str, str]
    content_length: int | None
    started: float
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False  # the body ended (zero-length chunk, or the whole Content-Length)
    status: int | None = None  # what the endpoint answered, if it did
    answered: float | None = None  # when
    ended: float | None = None  # when the body ended, the connection died or was closed
    connection: int = 0  # which connect made the connection it came on (1: the first)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def probe(self) -> bool:
        return self.content_length == 0


class MemoryEndpoint:
    """A scripted endpoint and the transport to it. See the module docstring."""

    def __init__(self, *, status: int = 200, read_rate: float | None = None, buffer: int = 256 * 1024) -> None:
        self.status = status
        self.read_rate = read_rate
        self.buffer = buffer
        self.refuse = False
        self.silent = False
        self.connect_delay = 0.0
        self.close_after: int | None = None
        self.answer_after: tuple[int, int] | None = None
        self.keep_alive = False
        self.most_open = 0
        self.requests: list[MemoryRequest] = []
        self.connects: list[float] = []  # when each connect was attempted
        self._open: set[MemoryConnection] = set()
        self._changed = trio.Event()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def posts(self) -> list[MemoryRequest]:
        """The chunked requests (the probes left out)."""
        return [r for r in self.requests if not r.probe]

    async def connect(self, target: Target, ca_file: Path | None, within: float) -> MemoryConnection:
        self.connects.append(trio.current_time())
        self.changed()
        if self.connect_delay:
            with trio.move_on_after(within):
                await trio.sleep(self.connect_delay)
            if self.connect_delay >= within:
                raise timed_out(target.url, "connect", within)
        else:
            await trio.lowlevel.checkpoint()
        if self.refuse:
            raise EndpointError(target.url, "connection failed: ConnectionRefusedError: [Errno 111] Connection refused")
        connection = MemoryConnection(self, target)
        self._open.add(connection)
        self.most_open = max(self.most_open, len(self._open))
        return connection

    def close_idle(self) -> None:
        """Every connection waiting between requests (its last one answered) is closed now."""
        for connection in list(self._open):
            if connection.request is None or connection.request.status is not None:
                connection.die("closed by the endpoint while idle")

    def reset(self) -> None:
        """Every open connection dies now (its next write or read fails)."""
        for connection in list(self._open):
            connection.die("reset by the endpoint")

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds, checked whenever a request changes (the caller sets the
        deadline). Cancellation: simply stops waiting."""
        while not predicate():
            await self._changed.wait()

    async def next_change(self) -> None:
        """Until a request or connection changes. Cancellation: simply stops waiting."""
        await self._changed.wait()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class MemoryConnection:
    """One connection to a :class:`MemoryEndpoint`."""

    def __init__(self, endpoint: MemoryEndpoint, target: Target) -> None:
        self.endpoint = endpoint
        self.target = target
        self.number = len(endpoint.connects)
        self.request: MemoryRequest | None = None
        self.body_bytes = 0
        self.close_after = endpoint.close_after
        self._dead: str | None = None
        self._answer: Response | None = None
        self._event = trio.Event()  # set when an answer is ready or the connection died
        self._died = trio.Event()
        self._unread = 0.0  # bytes in the buffer at ``_unread_at``
        self._unread_at = trio.current_time()

    # --- the endpoint's side ----------------------------------------------------------------

    def die(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
            self._died.set()
            if self.request is not None and self.request.ended is None:
                self.request.ended = trio.current_time()
            self.endpoint._open.discard(self)
            self._event.set()
            self.endpoint.changed()

    def _answer_now(self, status: int) -> None:
        if self._answer is None and self.request is not None:
            self._answer = Response(status, REASONS.get(status, ""))
            self.request.status = status
            self.request.answered = trio.current_time()
            self._event.set()
            self.endpoint.changed()

    # --- the publisher's side (the Connection protocol) -------------------------------------

    async def send_head(self, headers: Sequence[tuple[str, str]], *, content_length: int | None,
                        within: float) -> None:  # fmt: skip
        await self._check()
        self.request = MemoryRequest(self.target.path, dict(headers), content_length, trio.current_time(),
                                     connection=self.number)  # fmt: skip
        self.endpoint.requests.append(self.request)
        self.endpoint.changed()
        if content_length is None and not 200 <= self.endpoint.status < 300:
            self._answer_now(self.endpoint.status)  # a refusal does not wait for the body

    async def send_chunk(self, data: bytes, within: float, *, checkpoint: bool = True) -> None:
        await self._check()
        request = self.request
        assert request is not None, "send_head first"
        if self.close_after is not None and self.body_bytes + len(data) > self.close_after:
            kept = self.close_after - self.body_bytes
            request.chunks.append(data[:kept])
            self.body_bytes += kept
            self.die(f"closed after {self.close_after} bytes")
            await self._check()
        done_at = self._make_room(len(data))
        if done_at is None or done_at - trio.current_time() > within:
            with trio.move_on_after(within):  # the deadline passes first, unless the connection dies
                await self._died.wait()
            await self._check()
            raise timed_out(self.target.url, "write", within)
        with trio.move_on_at(done_at):
            await self._died.wait()
        await self._check()
        request.chunks.append(data)
        self.body_bytes += len(data)
        self.endpoint.changed()
        answer_after = self.endpoint.answer_after
        if answer_after is not None and request.content_length is None and self.body_bytes >= answer_after[0]:
            self.endpoint.answer_after = None
            self._answer_now(answer_after[1])

    async def end_body(self, within: float) -> None:
        await self._check()
        request = self.request
        assert request is not None, "send_head first"
        request.complete = True
        request.ended = trio.current_time()
        self.endpoint.changed()
        if not self.endpoint.silent:
            self._answer_now(self.endpoint.status)

    async def receive_response(self) -> Response:
        await self._event.wait()
        if self._answer is not None:
            return self._answer
        raise EndpointError(self.target.url, f"the server closed the connection without answering ({self._dead})")

    def unacked_bytes(self) -> int:
        return int(self._unread_now())

    def reusable(self) -> bool:
        request = self.request
        return (self.endpoint.keep_alive and self._dead is None and request is not None and request.complete
                and self._answer is not None)  # fmt: skip

    def next_request(self, target: Target) -> bool:
        if not self.reusable() or (target.host, target.port) != (self.target.host, self.target.port):
            return False
        self.target, self.request, self._answer, self._event = target, None, None, trio.Event()
        self.body_bytes, self.close_after = 0, self.endpoint.close_after
        return True

    async def aclose(self) -> None:
        if self.request is not None and self.request.ended is None:
            self.request.ended = trio.current_time()
        self.endpoint._open.discard(self)
        if self._dead is None:
            self._dead = "closed by the publisher"
            self._died.set()
            self._event.set()
        self.endpoint.changed()
        await trio.lowlevel.checkpoint()

    # --- internals --------------------------------------------------------------------------

    async def _check(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._dead is not None:
            raise EndpointError(self.target.url, f"connection failed: ConnectionResetError: {self._dead}")

    def _unread_now(self) -> float:
        rate = self.endpoint.read_rate
        now = trio.current_time()
        if rate is None:
            self._unread = 0.0
        else:
            self._unread = max(0.0, self._unread - rate * (now - self._unread_at))
        self._unread_at = now
        return self._unread

    def _make_room(self, size: int) -> float | None:
        """When a write of ``size`` bytes completes (None: never); the buffer then holds it."""
        rate = self.endpoint.read_rate
        unread = self._unread_now()
        if rate is None:
            return self._unread_at
        overflow = unread + size - self.endpoint.buffer
        if overflow <= 0:
            self._unread = unread + size
            return self._unread_at
        if rate <= 0:
            return None
        wait = overflow / rate
        self._unread, self._unread_at = float(self.endpoint.buffer), self._unread_at + wait
        return self._unread_at
