"""Serve an ASGI app on trio with hypercorn: the one HTTP-server seam of the package.

Hypercorn (h11 underneath) does the HTTP parsing; we only bind, report the bound address to
``nursery.start`` and answer ASGI lifespan events so apps without lifespan support start quietly.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from orchestrator.profile import parse_listen

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


async def serve_asgi(
    app: ASGIApp,
    host: str,
    port: int,
    name: str = "http",
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` (port 0 picks a free one) until cancelled.

    Reports the bound ``(host, port)`` through ``task_status``. Cancellation closes the
    listener and every open connection; requests in flight see their connection cut.
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger(f"orchestrator.{name}.http")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 0

    async def _serve(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(_with_lifespan(app), config, task_status=task_status, mode="asgi")  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        bound_host, bound_port = parse_listen(binds[0].split("://", 1)[1])
        log.info("%s.listening url=http://%s:%d", name, host if ":" not in host else f"[{host}]", bound_port)
        task_status.started((bound_host, bound_port))
