"""HTTP clients for the publishers: one small client per publisher, one TLS context per CA bundle.

Why not one shared client. A long-running ingest POST owns its connection for its whole life,
and every retry opens a new connection on purpose (the probe goes out with ``Connection: close``,
so the POST after it always starts fresh): a shared pool buys nothing here, and it cost a lot.
httpx ignores a client's ``limits`` when a transport is given, so the shared transport's default
pool of 100 connections capped the whole process at 100 POSTs (the others waited for a
``PoolTimeout`` forever); and httpcore assigns queued requests to connections by scanning every
connection for every request, so CPU grew with the square of the number of POSTs.

Design: each :class:`~orchestrator.push.publisher.Publisher` gets its own ``httpx.AsyncClient``
with its own transport and pool. The pool holds at most the probe's connection and the POST's
(``max_connections=2``) and keeps none idle (``max_keepalive_connections=0``), so the pool scan
is over one or two entries, the cost per publisher is constant, and an idle publisher holds no
file descriptor. What is expensive to build is shared: one ``ssl.SSLContext`` per CA bundle
(loading a trust store takes milliseconds and about a megabyte; a client takes about 10 kB and
50 µs). Everything the publisher relies on is unchanged: httpx's timeouts (connect, write per
chunk, read), its trace hook (for the readability watch), TLS verification (always on; a
profile may only add a CA bundle), auth, and the socket options below.

Alternatives considered: h11 over trio streams, one connection per POST, would drop httpx's
per-chunk overhead but re-implements TLS, timeouts, auth and proxies that httpx already gets
right; the measured cost per chunk with httpx is small next to the encoder's (``bench/scale.py``).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx

from orchestrator.push.publisher import PublisherSettings

# The probe's connection (closing) and the POST's: never more than two at once per publisher.
CONNECTIONS_PER_PUBLISHER = 2
# Those two sockets, and the duplicate of the POST's that the publisher's readability watch waits on.
FILES_PER_PUBLISHER = CONNECTIONS_PER_PUBLISHER + 1


class ClientFactory:
    """Builds one ``httpx.AsyncClient`` per publisher; shares the TLS contexts. Not thread-safe
    (one per ``up``); the caller closes the clients it was given."""

    def __init__(self, settings: PublisherSettings) -> None:
        self._socket_options = socket_options(settings)
        self._contexts: dict[Path | None, ssl.SSLContext] = {}
        self._limits = httpx.Limits(max_connections=CONNECTIONS_PER_PUBLISHER, max_keepalive_connections=0)

    def ssl_context(self, ca_file: Path | None) -> ssl.SSLContext:
        """:func:`tls_context`, built once per CA bundle."""
        context = self._contexts.get(ca_file)
        if context is None:
            context = self._contexts[ca_file] = tls_context(ca_file)
        return context

    def client(self, ca_file: Path | None) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(
            verify=self.ssl_context(ca_file), socket_options=self._socket_options, limits=self._limits)  # fmt: skip
        return httpx.AsyncClient(transport=transport, limits=self._limits)


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The client TLS context: httpx's default trust (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` if set,
    else certifi's bundle) plus, if given, the endpoint's ``ca_file`` as an *extra* bundle.
    Verification is always on; a profile can only add CAs to trust, never replace or disable them.
    Raises OSError/ssl.SSLError if the bundle cannot be read."""
    context = httpx.create_ssl_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def socket_options(settings: PublisherSettings) -> list[tuple[int, int, int]]:
    """TCP_NODELAY, and TCP_USER_TIMEOUT (Linux): a connection whose sent data stays
    unacknowledged for the send timeout is dropped by the kernel. That is how a real black hole
    (a dead link, a firewall dropping packets) surfaces even when our writes still fit in the
    socket buffer."""
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(settings.send_timeout * 1000)))
    return options
