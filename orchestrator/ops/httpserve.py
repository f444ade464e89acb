"""Serve an ASGI app on trio with hypercorn: the one HTTP-server seam of the package.

Hypercorn (h11 underneath) does the HTTP parsing; we bind, report the bound address to
``nursery.start``, answer ASGI lifespan events so apps without lifespan support start quietly,
and guard the listener:

* **Connection cap.** At most ``max_connections`` connections are open at once. Without it,
  1,030 idle connections took every file descriptor of a default 1,024 limit and locked every
  client out. A connection that arrives at the cap first makes room if it can, by **evicting**
  the oldest connection that holds a slot without using it (issue 20: 2,000 idle sockets locked
  good clients out for about 56 s, and 1,030 POSTs that sent headers and no body made a good
  client's POST answer 503 until the body timeout):

  1. an *idle* connection: no request inside the application (it never sent a whole request
     head, or it waits between keep-alive requests); it is answered ``408 Request Timeout``
     (``Connection: close``, the body names ``max_connections``) and closed;
  2. else a connection whose request has waited ``no_body_grace`` seconds (2) for the first
     byte of its body; answered the same way. The application sees its client go away.

  Each eviction logs ``<name>.connections.evicted reason=idle|no_body`` and counts into
  :class:`ConnectionStats`. Only when every slot is in real use is the new connection answered
  ``503 Service Unavailable`` (``Retry-After: 5``, ``Connection: close``) and closed; the first
  one of an episode logs ``<name>.connections.capped``, and ``<name>.connections.cap_cleared``
  says when the count is below the cap again and how many were refused.
* **File descriptors exhausted** (EMFILE/ENFILE on accept): logged once per episode
  (``<name>.accept.fd_exhausted``, then ``<name>.accept.recovered`` with the duration), not ten
  times a second; accepting is retried every 100 ms meanwhile, as trio does.

To put the guard in front of hypercorn's connection handler, :func:`serve_asgi` runs
hypercorn's trio ``TCPServer`` itself (what ``hypercorn.trio.serve`` does, minus lifespan,
statsd and QUIC, which we do not use); it is tested against the hypercorn version range pinned in
pyproject.toml.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_CONNECTIONS = 512  # well under the common 1,024 open-file limit, which archive files share
DEFAULT_NO_BODY_GRACE = 2.0  # seconds a request may wait for its first body byte before it can be evicted
_FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_OVER_CAP_BODY = b"too many open connections to this server; retry later\n"
_OVER_CAP = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 5\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_OVER_CAP_BODY), _OVER_CAP_BODY)
)


def _evicted_answer(reason: str) -> bytes:
    body = (f"this connection {reason} while the server is at its connection cap (max_connections): "
            f"closed to make room; reconnect when you have something to send\n").encode()  # fmt: skip
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip


_EVICTED = {
    "idle": _evicted_answer("sent no request"),
    "no_body": _evicted_answer("sent no body bytes"),
}


def _with_lifespan(app: ASGIApp) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await app(scope, receive, send)

    return wrapped


class _CountedStream(trio.abc.HalfCloseableStream):
    """A socket stream that gives its slot back to the listener when closed (once). It has no
    ``do_handshake``, so hypercorn takes it for the plain TCP stream it is.

    ``send_all`` and ``send_eof`` take turns: hypercorn closes a connection (``send_eof``) from
    another task than the one sending, and when the app answers before the request body ended
    (a 408, a 400 mid-body) the two met, trio raised BusyResourceError and the answer was lost."""

    def __init__(self, inner: trio.SocketStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release
        self._sending = trio.Lock()
        self.socket = inner.socket
        self.requests = 0  # requests of this connection inside the application now
        self.waiting_since = math.inf  # when its request began to wait for a first body byte (inf: not waiting)

    async def evict(self, answer: bytes) -> None:
        """Answer ``answer`` (bounded: 0.5 s) and close the socket now: the task reading it wakes
        with ClosedResourceError and hypercorn ends the connection. Gives the slot back at once."""
        with trio.move_on_after(0.5), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send_all(answer)
        self.socket.close()  # trio's close wakes the tasks waiting on the socket
        self._give_back()

    def _give_back(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        async with self._sending:
            await self._inner.send_eof()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._give_back()


@dataclass
class ConnectionStats:
    """What the guarded listener counts, for an app's status page: connections open now,
    connections refused over the cap, and episodes of file descriptors exhausted."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    open: int = 0
    refused: int = 0
    fd_exhausted_episodes: int = 0
    evicted_idle: int = 0  # connections closed at the cap that had no request inside the application
    evicted_no_body: int = 0  # ... whose request waited no_body_grace seconds for its first body byte


class _TCPServer(TCPServer):
    """hypercorn's connection handler, but a connection the client closed while idle is let go
    at once: hypercorn 0.18 keeps its keep-alive timer (75 s here) running after the client's
    EOF, so each such connection held its file descriptor, and a slot under the cap, for 75 s."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class GuardedListener(trio.abc.Listener[trio.abc.Stream]):
    """A TCP listener with the connection cap and the once-per-episode EMFILE log described in
    the module docstring; it counts into ``stats`` (shared by the listeners of one server)."""

    def __init__(self, inner: trio.SocketListener, name: str, stats: ConnectionStats, *,
                 connections: dict[tuple[str, int], _CountedStream] | None = None,
                 no_body_grace: float = DEFAULT_NO_BODY_GRACE,
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self._inner = inner
        self._ssl_context = ssl_context  # TLS on every accepted connection (hypercorn does the handshake)
        self._name = name
        self.stats = stats
        self._capped_refusals: int | None = None  # refusals in the current cap episode
        self._exhausted: tuple[float, int] | None = None  # (since, retries) in an EMFILE episode
        # Open connections by peer address (hypercorn's scope["client"]), oldest first; shared by
        # the listeners of one server, and read by the application wrapper (_tracking).
        self.connections = connections if connections is not None else {}
        self._no_body_grace = no_body_grace

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._inner.socket

    async def accept(self) -> trio.abc.Stream:
        while True:
            try:
                stream = await self._inner.accept()
            except OSError as exc:
                if exc.errno not in _FD_EXHAUSTED:
                    raise
                if self._exhausted is None:
                    self._exhausted = (trio.current_time(), 0)
                    self.stats.fd_exhausted_episodes += 1
                    log.error("%s.accept.fd_exhausted error=%s open_connections=%d max_connections=%d hint=%s",
                              self._name, errno.errorcode.get(exc.errno or 0, exc.errno), self.stats.open,
                              self.stats.max_connections, "raise the open-file limit (ulimit -n) or lower the "
                              "connection cap; retrying every 100 ms")  # fmt: skip
                self._exhausted = (self._exhausted[0], self._exhausted[1] + 1)
                await trio.sleep(0.1)
                continue
            if self._exhausted is not None:
                since, retries = self._exhausted
                self._exhausted = None
                log.warning("%s.accept.recovered seconds=%.1f retries=%d", self._name,
                            trio.current_time() - since, retries)  # fmt: skip
            if self.stats.open >= self.stats.max_connections:
                await self._make_room()
            if self.stats.open >= self.stats.max_connections:
                await self._refuse(stream)
                continue
            self.stats.open += 1
            peer = _peer(stream)
            counted = _CountedStream(stream, partial(self._release, peer))
            if peer is not None:
                self.connections[peer] = counted
            if self._ssl_context is not None:  # TLS on top of the counted stream (hypercorn does the handshake)
                return trio.SSLStream(counted, self._ssl_context, server_side=True, https_compatible=True)
            return counted

    async def _make_room(self) -> None:
        """Evict the oldest idle connection, else the oldest that waits for a first body byte
        longer than the grace (see the module docstring); nothing if every slot is in use."""
        now = trio.current_time()
        victim = next(((peer, c) for peer, c in self.connections.items() if c.requests == 0), None)
        reason = "idle"
        if victim is None:
            reason = "no_body"
            victim = next(((peer, c) for peer, c in self.connections.items()
                           if now - c.waiting_since >= self._no_body_grace), None)  # fmt: skip
        if victim is None:
            return
        peer, connection = victim
        if reason == "idle":
            self.stats.evicted_idle += 1
        else:
            self.stats.evicted_no_body += 1
        log.warning("%s.connections.evicted reason=%s peer=%s:%d max_connections=%d evicted_idle=%d "
                    "evicted_no_body=%d", self._name, reason, peer[0], peer[1], self.stats.max_connections,
                    self.stats.evicted_idle, self.stats.evicted_no_body)  # fmt: skip
        await connection.evict(_EVICTED[reason])

    async def _refuse(self, stream: trio.SocketStream) -> None:
        self.stats.refused += 1
        if self._capped_refusals is None:
            self._capped_refusals = 0
            log.warning("%s.connections.capped max_connections=%d action=%s", self._name, self.stats.max_connections,
                        "new connections are answered 503 and closed until some close")  # fmt: skip
        self._capped_refusals += 1
        with trio.move_on_after(0.5):  # a fresh socket's send buffer is empty: this does not wait
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(_OVER_CAP)
        await trio.aclose_forcefully(stream)

    def _release(self, peer: tuple[str, int] | None = None) -> None:
        if peer is not None:
            self.connections.pop(peer, None)
        self.stats.open -= 1
        if self._capped_refusals is not None and self.stats.open < self.stats.max_connections:
            log.info("%s.connections.cap_cleared open_connections=%d refused=%d", self._name, self.stats.open,
                     self._capped_refusals)  # fmt: skip
            self._capped_refusals = None

    async def aclose(self) -> None:
        await self._inner.aclose()


def _peer(stream: trio.SocketStream) -> tuple[str, int] | None:
    try:
        address = stream.socket.getpeername()
    except OSError:  # already reset by the peer
        return None
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else None


def _tracking(app: ASGIApp, connections: dict[tuple[str, int], _CountedStream]) -> ASGIApp:
    """``app``, telling each connection (found by ``scope["client"]``) when a request of it is
    inside the application and when that request waits for its first body byte."""

    async def tracked(scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        connection = connections.get((str(client[0]), int(client[1]))) if client else None
        if connection is None or scope["type"] != "http":
            await app(scope, receive, send)
            return
        first = True

        async def receive_tracked() -> Message:
            nonlocal first
            if not first:
                return await receive()
            connection.waiting_since = min(connection.waiting_since, trio.current_time())
            message = await receive()
            if message.get("body") or not message.get("more_body", False):
                first = False
                connection.waiting_since = math.inf
            return message

        connection.requests += 1
        try:
            await app(scope, receive_tracked, send)
        finally:
            connection.requests -= 1
            connection.waiting_since = math.inf

    return tracked


async def serve_asgi(
    app: ASGIApp,
    host: str,
    port: int,
    name: str = "http",
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    stats: ConnectionStats | None = None,
    no_body_grace: float = DEFAULT_NO_BODY_GRACE,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` (port 0 picks a free one) until cancelled, with at most
    ``max_connections`` connections open at once, counting into ``stats`` if given; at the cap,
    a request that waited ``no_body_grace`` seconds for its first body byte may be evicted; with
    ``ssl_context``, over TLS (hypercorn's handshake, bounded by its ``ssl_handshake_timeout``).

    Reports the bound ``(host, port)`` through ``task_status``. Cancellation closes the
    listener and every open connection; requests in flight see their connection cut.
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger(f"orchestrator.{name}.http")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 0

    sockets = config.create_sockets()
    stats = stats if stats is not None else ConnectionStats()
    stats.max_connections = max_connections
    listeners = []
    connections: dict[tuple[str, int], _CountedStream] = {}
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        inner = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        listeners.append(GuardedListener(inner, name, stats, connections=connections, no_body_grace=no_body_grace,
                                         ssl_context=ssl_context))  # fmt: skip
    bound_host, bound_port = sockets.insecure_sockets[0].getsockname()[:2]
    wrapped = _with_lifespan(_tracking(app, connections))
    handler = partial(_TCPServer, wrap_app(wrapped, config.wsgi_max_body_size, "asgi"), config,  # type: ignore[arg-type]
                      WorkerContext(None), {})  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, handler, listeners, handler_nursery=nursery))
        log.info("%s.listening url=http://%s:%d max_connections=%d", name, host if ":" not in host else f"[{host}]",
                 bound_port, max_connections)  # fmt: skip
        task_status.started((bound_host, bound_port))
