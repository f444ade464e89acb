"""The metrics listener's routes: ``/metrics``, ``/healthz``, ``/readyz``, ``/status``; 404 otherwise.

- ``/metrics``: the Prometheus text (prometheus-client's own ASGI app).
- ``/healthz``: liveness. 200 ``ok`` whenever it answers at all: it is served by the same trio
  event loop as the encoders and publishers, so an answer means the loop is not stuck.
- ``/readyz``: 200 ``ready``, or 503 with one reason per line (see
  :func:`orchestrator.ops.status.not_ready`).
- ``/status``: the JSON document of :func:`orchestrator.ops.status.status_document`.

Only GET and HEAD are served (405 otherwise). Nothing here writes; no secret is in any answer
(the states hold endpoint names and regions, never URLs or credentials).
"""

from __future__ import annotations

import json
import time

import trio
from prometheus_client import CollectorRegistry, make_asgi_app

from orchestrator.ops.httpserve import ASGIApp, Message, Receive, Scope, Send, serve_asgi
from orchestrator.ops.state import LiveState
from orchestrator.ops.status import status_document

ROUTES = ("/metrics", "/healthz", "/readyz", "/status")


def make_app(registry: CollectorRegistry, live: LiveState) -> ASGIApp:
    metrics_app = make_asgi_app(registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
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
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the routes above until cancelled; reports the bound (host, port).

    Cancellation: the listener closes; requests in flight are cut off.
    """
    await serve_asgi(make_app(registry, live), host, port, name="metrics", task_status=task_status)
