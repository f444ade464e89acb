"""The confidence monitor's HTTP side, shared by ``up``'s ops listener, ``orchestrator ingest``
and ``orchestrator relay``'s metrics listener.

Routes (GET and HEAD only; the caller checks the method):

* ``/monitor``: the page (static HTML), ``/monitor.js`` and ``/monitor.css``: its script and
  style, served from the package (no external asset: the page works on an isolated network);
* ``/monitor.json``: the document the page polls; each request renews the viewer lease
  (:class:`orchestrator.ops.monitor.ViewerLease`), so pictures are decoded only while a page is
  open; ``?peers=0`` leaves the peers out (what a peer asks for: two processes that list each
  other never ask each other in a loop);
* ``/monitor/thumb?s=<stream>[&t=<track>]&g=<group>&i=<index>``: a tile's latest thumbnail (PNG);
* on ``up`` with ``[monitor] peers``: ``/monitor/peer/<n>/thumb?...``, the same from peer n,
  fetched by this process (so the page's Content-Security-Policy stays ``'self'``).

Every answer carries a strict Content-Security-Policy (no inline script or style, nothing from
elsewhere, no framing), ``nosniff`` and ``no-referrer``. The HTML holds no name at all: the
script puts every stream, group and error into the page with ``textContent``, so a name is
never markup. Nothing here writes or needs a secret (peers are plain URLs; TLS is verified).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import trio

from orchestrator.ops.httpserve import Scope, Send
from orchestrator.ops.monitor import Key, Picture, Row, TileJudge, poll_seconds
from orchestrator.ops.thumbnails import Thumbnailer

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
STATIC = {"/monitor": ("monitor.html", "text/html"), "/monitor.js": ("monitor.js", "text/javascript"),
          "/monitor.css": ("monitor.css", "text/css")}  # fmt: skip
ROUTES = (*STATIC, "/monitor.json", "/monitor/thumb")
PEER_TIMEOUT = 2.0
MAX_PEER_BODY = 4 * 1024 * 1024


def _static(name: str) -> bytes:
    return resources.files("orchestrator.ops").joinpath("static", name).read_bytes()


def is_monitor_path(path: str) -> bool:
    return path in ROUTES or path.startswith("/monitor/peer/")


async def answer(send: Send, status: int, content_type: str, body: bytes) -> None:
    """An answer with the monitor's security headers."""
    charset = b"" if content_type.startswith("image/") else b"; charset=utf-8"
    headers = [
        (b"content-type", content_type.encode() + charset),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_static(path: str, send: Send) -> bool:
    """Answer ``path`` if it is the page, its script or its style; False otherwise."""
    entry = STATIC.get(path)
    if entry is None:
        return False
    await answer(send, 200, entry[1], _static(entry[0]))
    return True


def thumb_url(key: Key, index: int) -> str:
    """A tile's thumbnail URL (relative to the site root)."""
    row, group = key
    query = [("s", row[0])] + ([("t", row[1])] if len(row) > 1 else []) + [("g", group), ("i", str(index))]
    return "/monitor/thumb?" + urlencode(query)


def key_of(scope: Scope) -> Key | None:
    """The tile a thumbnail request names, or None."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    stream, group = query.get("s", [None])[0], query.get("g", [None])[0]
    if stream is None or group is None:
        return None
    track = query.get("t", [None])[0]
    row: Row = (stream,) if track is None else (stream, track)
    return row, group


async def serve_thumb(scope: Scope, send: Send, pictures: dict[Key, tuple[Picture, TileJudge]]) -> None:
    """The tile's picture of index ``i`` (one it still holds), else its newest."""
    key = key_of(scope)
    entry = pictures.get(key) if key is not None else None
    index = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("i", [""])[0]
    picture = None
    if entry is not None:
        picture = (entry[1].picture(int(index)) if index.isdigit() else None) or entry[0]
    if picture is None or picture.png is None:
        await answer(send, 404, "text/plain", b"no picture for this tile (yet)\n")
        return
    await answer(send, 200, "image/png", picture.png)


def json_body(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def document(kind: str, presentation: str, fragment_seconds: float, thumbnailer: Thumbnailer, now_wall: float,
             **parts: Any) -> dict[str, Any]:  # fmt: skip
    """A ``/monitor.json`` document: what every kind of page (``up``, ``ingest``, ``relay``)
    starts with (how often to poll, whether pictures are decoded), then the kind's ``parts``
    (``streams`` or ``rows``, ``peers``)."""
    return {
        "kind": kind,
        "presentation": presentation,
        "fragment_duration": fragment_seconds,
        "poll_seconds": poll_seconds(fragment_seconds),
        "time": round(now_wall, 3),
        "decoding": thumbnailer.ffmpeg is not None,
        "decodes": thumbnailer.counts.as_json(),
        **parts,
    }


class MonitorSource(Protocol):
    """What a process's monitor gives the listener that serves it: ``up``'s
    :class:`~orchestrator.ops.listener.UpMonitor`, the relay's :class:`~orchestrator.relay.monitor.RelayMonitor`."""

    @property
    def thumbnailer(self) -> Thumbnailer: ...

    @property
    def peers(self) -> Peers | None: ...

    async def document(self, *, with_peers: bool = True) -> dict[str, Any]: ...


async def serve(source: MonitorSource, scope: Scope, send: Send) -> None:
    """Answer a monitor route from ``source`` (the caller checked :func:`is_monitor_path` and GET)."""
    path = scope["path"]
    if await serve_static(path, send):
        return
    if path == "/monitor.json":
        with_peers = b"peers=0" not in scope.get("query_string", b"").split(b"&")
        await answer(send, 200, "application/json", json_body(await source.document(with_peers=with_peers)))
    elif path == "/monitor/thumb":
        await serve_thumb(scope, send, source.thumbnailer.pictures)
    elif source.peers is not None:
        await source.peers.serve_thumb(scope, send)
    else:
        await answer(send, 404, "text/plain", b"no peers: [monitor] peers is empty\n")


class Peers:
    """The monitor endpoints of the groups in other processes (``[monitor] peers``): their
    ``/monitor.json`` fetched (at most once per ``refresh`` seconds, whoever asks), their
    thumbnails proxied. A peer that does not answer is reported, never fatal."""

    def __init__(self, urls: list[str], refresh: float) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.names = [urlsplit(u).netloc for u in self.urls]
        self.refresh = refresh
        self._documents: list[dict[str, Any] | None] = [None] * len(urls)
        self._errors: list[str | None] = [None] * len(urls)
        self._fetched_at = -float("inf")
        self._lock = trio.Lock()
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=PEER_TIMEOUT, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def documents(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        """(name, document, error or None) per peer, fetched if older than ``refresh``; with an
        error, the document is the last one the peer gave (None if it never answered)."""
        async with self._lock:
            if trio.current_time() - self._fetched_at >= self.refresh:
                async with trio.open_nursery() as nursery:
                    for n in range(len(self.urls)):
                        nursery.start_soon(self._fetch, n)
                self._fetched_at = trio.current_time()
        return list(zip(self.names, self._documents, self._errors, strict=True))

    async def _fetch(self, n: int) -> None:
        try:
            body = await self._get(f"{self.urls[n]}/monitor.json?peers=0")  # its own tiles: peers never recurse
            document = json.loads(body)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            self._documents[n], self._errors[n] = document, None
        except (httpx.HTTPError, ValueError, OSError) as exc:
            if self._errors[n] is None:
                log.warning("monitor.peer.failed peer=%s error=%s", self.names[n], exc)
            self._errors[n] = _describe(exc)  # the last document stays: its tiles are shown as unreachable

    async def _get(self, url: str) -> bytes:
        async with self.client().stream("GET", url) as response:
            if response.status_code != 200:
                raise ValueError(f"answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_PEER_BODY:
                    raise ValueError(f"answer over {MAX_PEER_BODY} bytes")
            return bytes(body)

    def rewrite(self, n: int) -> Callable[[Any], str | None]:
        """The peer's thumbnail URL as our proxy URL (None for anything else)."""

        def rewrite(url: Any) -> str | None:
            if not isinstance(url, str) or not url.startswith("/monitor/thumb?"):
                return None
            return f"/monitor/peer/{n}/thumb?" + url.partition("?")[2]

        return rewrite

    async def serve_thumb(self, scope: Scope, send: Send) -> None:
        parts = scope["path"].split("/")  # "", "monitor", "peer", n, "thumb"
        if len(parts) != 5 or parts[4] != "thumb" or not parts[3].isdigit() or int(parts[3]) >= len(self.urls):
            await answer(send, 404, "text/plain", b"no such peer thumbnail\n")
            return
        key = key_of(scope)
        if key is None:
            await answer(send, 404, "text/plain", b"no such peer thumbnail\n")
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        index = query.get("i", ["0"])[0]
        url = f"{self.urls[int(parts[3])]}/monitor/thumb?" + thumb_url(key, int(index) if index.isdigit() else 0)\
            .partition("?")[2]  # fmt: skip
        try:
            body = await self._get(url)
        except (httpx.HTTPError, ValueError, OSError) as exc:
            await answer(send, 502, "text/plain", f"peer: {_describe(exc)}\n".encode())
            return
        await answer(send, 200, "image/png", body)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
