"""The publisher's one I/O seam: how a request reaches an endpoint.

A :class:`Transport` opens a :class:`Connection` to a target; a connection carries a request
(head, body chunks each written within a deadline, the end of the body) and its response, which
may be read by another task while the body is still being sent; then, if HTTP/1.1 keep-alive
allows (:meth:`Connection.reusable`), further requests in turn (:meth:`Connection.next_request`). Every method raises
:class:`~orchestrator.errors.EndpointError` (built by :mod:`orchestrator.push.failures`) on a
transport failure or a deadline; nothing else escapes.

Two implementations: :class:`orchestrator.push.connection.Connector` (h11 over trio streams,
TCP and TLS: what ``up`` runs) and :class:`orchestrator.push.memory.MemoryEndpoint` (in memory,
on trio's clock: scripted answers, a receiver reading at a given rate, a connection that dies
at byte N; for tests that need no real peer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import httpx


@dataclass(frozen=True)
class Target:
    """Where a request goes: from an ``http(s)://host[:port]/path`` URL."""

    url: str
    tls: bool
    host: str
    port: int
    host_header: str
    path: bytes  # the request target: path and query, percent-encoded

    @classmethod
    def parse(cls, url: str) -> Target:
        parsed = httpx.URL(url)  # httpx's URL parser: IDNA, percent-encoding, default ports
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"{url}: only http and https URLs can be pushed to")
        tls = parsed.scheme == "https"
        port = parsed.port or (443 if tls else 80)
        host = parsed.host
        netloc = parsed.netloc.decode("ascii")
        return cls(url, tls, host, port, netloc, parsed.raw_path)


class Response(NamedTuple):
    status: int
    reason: str


class Connection(Protocol):
    """One request and its response. One task may send while another receives."""

    async def send_head(self, headers: Sequence[tuple[str, str]], *, content_length: int | None,
                        within: float) -> None:  # fmt: skip
        """The request line and headers of a POST; a chunked body unless ``content_length``."""

    async def send_chunk(self, data: bytes, within: float, *, checkpoint: bool = True) -> None:
        """``data`` as one chunk of the body, written within ``within`` seconds."""

    async def end_body(self, within: float) -> None:
        """The end of the body (the zero-length chunk)."""

    async def receive_response(self) -> Response:
        """The response; no deadline of its own (the caller sets one, or reads for the life of
        the request to learn at once that the endpoint answered or went away)."""
        ...

    def unacked_bytes(self) -> int:
        """Bytes written that the peer has not acknowledged yet (0 if unknown)."""
        ...

    def reusable(self) -> bool:
        """After a request's response: whether the connection can carry another (both messages
        complete, neither side said ``Connection: close``)."""
        ...

    def next_request(self, target: Target) -> bool:
        """Make ready for the next request on this connection, kept since the last one, to
        ``target``; False if it cannot carry it (another host, port or scheme; or the server
        closed the connection, or sent something unasked, meanwhile): the caller then closes it."""
        ...

    async def aclose(self) -> None:
        """Close at once. Cancellation: closes anyway."""


class Transport(Protocol):
    async def connect(self, target: Target, ca_file: Path | None, within: float) -> Connection:
        """A new connection to ``target`` within ``within`` seconds."""
        ...
