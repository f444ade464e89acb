"""The metrics listener's routes: ``/metrics``, ``/healthz``, ``/readyz``, ``/status``, the
confidence monitor (``/monitor`` and what it loads, :mod:`orchestrator.ops.monitorweb`); 404 otherwise.

- ``/metrics``: the Prometheus text (prometheus-client's own ASGI app).
- ``/healthz``: liveness. 200 ``ok`` whenever it answers at all: it is served by the same trio
  event loop as the encoders and publishers, so an answer means the loop is not stuck.
- ``/readyz``: 200 ``ready``, or 503 with one reason per line (see
  :func:`orchestrator.ops.status.not_ready`).
- ``/status``: the JSON document of :func:`orchestrator.ops.status.status_document`.
- ``/monitor``, ``/monitor.json``, ...: the confidence monitor (:class:`UpMonitor`): each group's
  latest picture per stream beside the ``/status`` facts, decoded only while a page is open.

Only GET and HEAD are served (405 otherwise). Nothing here writes; no secret is in any answer
(the states hold endpoint names and regions, never URLs or credentials).
"""

from __future__ import annotations

import functools
import json
import time
from fractions import Fraction
from typing import Any

import trio
from prometheus_client import CollectorRegistry, make_asgi_app

from orchestrator.ops import monitorweb
from orchestrator.ops.httpserve import ASGIApp, Message, Receive, Scope, Send, serve_asgi
from orchestrator.ops.monitor import Key, merge_peer, up_tiles
from orchestrator.ops.state import LiveState
from orchestrator.ops.status import status_document
from orchestrator.ops.thumbnails import Thumbnailer

ROUTES = ("/metrics", "/healthz", "/readyz", "/status")


class UpMonitor:
    """``up``'s confidence monitor: the ``/status`` facts, this process's pictures (``thumbnailer``)
    and the peers' tiles (``peers``, from ``[monitor] peers``) as one document per poll."""

    def __init__(self, live: LiveState, thumbnailer: Thumbnailer, *, epoch_ns: int, fragment_duration: Fraction,
                 peers: monitorweb.Peers | None = None) -> None:  # fmt: skip
        self.live = live
        self.thumbnailer = thumbnailer
        self.epoch_ns = epoch_ns
        self.fragment_ns = (fragment_duration.numerator * 10**9, fragment_duration.denominator)
        self.peers = peers

    async def document(self, *, with_peers: bool = True) -> dict[str, Any]:
        self.thumbnailer.watch()
        now_wall, now = time.time(), trio.current_time()
        status = status_document(self.live, now_wall=now_wall, now_monotonic=now)
        ages: dict[Key, float | None] = {
            ((e.stream_id,), e.group): None if e.completed_monotonic is None else now - e.completed_monotonic
            for e in self.live.encoders
        }
        streams = up_tiles(status, self.thumbnailer.pictures, ages=ages, epoch_ns=self.epoch_ns,
                           fragment_ns=self.fragment_ns, thumb_url=monitorweb.thumb_url)  # fmt: skip
        peers = []
        if self.peers is not None and with_peers:
            for n, (name, document, error) in enumerate(await self.peers.documents()):
                if document is not None:
                    merge_peer(streams, document, name, self.peers.rewrite(n), unreachable=error is not None)
                peers.append({"name": name, "ok": error is None and document is not None, "error": error})
        return monitorweb.document("up", status["presentation"], status["fragment_duration"], self.thumbnailer,
                                   status["time"], streams=streams, peers=peers)  # fmt: skip


def make_app(registry: CollectorRegistry, live: LiveState, monitor: monitorweb.MonitorSource | None = None) -> ASGIApp:
    metrics_app = make_asgi_app(registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if monitor is not None and monitorweb.is_monitor_path(path):
            if scope["method"] not in ("GET", "HEAD"):
                await _answer(send, 405, "text/plain", b"method not allowed\n", allow=True)
                return
            if scope["method"] == "HEAD":
                send = _without_body(send)
            await monitorweb.serve(monitor, scope, send)
            return
        if path not in ROUTES:
            await _answer(send, 404, "text/plain", b"not found: this listener serves " + " ".join(ROUTES).encode())
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, "text/plain", b"method not allowed\n", allow=True)
            return
        if scope["method"] == "HEAD":
            send = _without_body(send)
        if path == "/metrics":
            await metrics_app(scope, receive, send)
            return
        if path == "/healthz":
            await _answer(send, 200, "text/plain", b"ok\n")
            return
        document = status_document(live, now_wall=time.time(), now_monotonic=trio.current_time())
        if path == "/readyz":
            reasons = document["not_ready"]
            body = ("ready\n" if not reasons else "".join(f"{r}\n" for r in reasons)).encode()
            await _answer(send, 503 if reasons else 200, "text/plain", body)
            return
        await _answer(send, 200, "application/json", json.dumps(document, indent=1).encode() + b"\n")

    return app


def _without_body(send: Send) -> Send:
    async def head_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return head_send


async def _answer(send: Send, status: int, content_type: str, body: bytes, *, allow: bool = False) -> None:
    headers = [(b"content-type", f"{content_type}; charset=utf-8".encode()), (b"cache-control", b"no-store")]
    if allow:
        headers.append((b"allow", b"GET, HEAD"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_listener(
    registry: CollectorRegistry,
    live: LiveState,
    host: str,
    port: int,
    *,
    monitor: monitorweb.MonitorSource | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the routes above until cancelled; reports the bound (host, port). With ``monitor``,
    the monitor's decoder runs here too.

    Cancellation: the listener closes; requests in flight are cut off; decodes in flight are
    killed; the peers' client is closed.
    """
    app = make_app(registry, live, monitor)
    if monitor is None:
        await serve_asgi(app, host, port, name="metrics", task_status=task_status)
        return
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.thumbnailer.run)
            bound = await nursery.start(functools.partial(serve_asgi, app, host, port, name="metrics"))
            task_status.started(bound)
    finally:
        if monitor.peers is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await monitor.peers.aclose()
