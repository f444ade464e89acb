"""HTTP/1.1 for the publishers, framed by h11, over trio streams. The real implementation of the
:class:`~orchestrator.push.transport.Transport` seam.

A Smooth publisher makes two kinds of request, both on a connection of their own: the probe (an
empty POST sent with ``Connection: close``) and the long-running chunked POST, which owns its
connection for its whole life; every retry opens a new connection on purpose. A CMAF publisher
(one request per segment) carries its requests one after the other on one kept connection
(HTTP/1.1 keep-alive: :meth:`HttpConnection.reusable`, :meth:`HttpConnection.next_request`);
which connection it keeps, and for how long, is the publisher's (one at most). So there is no
pool to manage: :meth:`Connector.connect` opens a TCP connection (and TLS over it), and an
:class:`HttpConnection` carries a request and its response, and possibly more in turn, then is
closed.

Why by hand, over h11, and not through httpx. httpx served here first, and cost too much at
scale: one client per publisher, its pool and its per-chunk path (an async generator resumed
by httpcore, an h11 event, a copy, a timeout scope and a trace hook per chunk) came to about
twice the CPU per fragment of this module (``bench/scale.py``: 4,000 POSTs from one process
took 87 % of a core and fragments arrived late). h11 still does every piece of HTTP framing
and parsing (request head, chunked encoding, the response and its body); what is written
here is what is specific to a long-running ingest POST and that httpx cannot express: writing
each fragment as one chunk with its own write deadline, reading the server's answer *while*
the body is still being sent (a publishing point that refuses or closes mid-POST is noticed at
once, over TLS too), and the socket of the POST in hand for ``SIOCOUTQ``.

What is kept from before, and tested: TLS verification always on (the default trust plus an
optional extra CA bundle, :func:`tls_context`), server name checked; ``TCP_NODELAY`` and
``TCP_USER_TIMEOUT`` (:func:`socket_options`); connect, write and read deadlines; errors turned
into :class:`~orchestrator.errors.EndpointError` with the reason along the exception's causes
(by :mod:`orchestrator.push.failures`, where every request failure is mapped).
Not supported: HTTP proxies (``HTTP(S)_PROXY`` is ignored; ingest endpoints are reached
directly) and redirects (a 3xx is an error, as it was).
"""

from __future__ import annotations

import fcntl
import select
import socket
import ssl
import struct
import termios
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

from orchestrator.errors import EndpointError
from orchestrator.push.failures import timed_out, transport_error
from orchestrator.push.transport import Response, Target

# The probe's connection and the POST's: never more than two at once per publisher, one file each.
FILES_PER_PUBLISHER = 2
RECEIVE_SIZE = 16 * 1024
# The most of a response we read: a status line, headers and a short body. A server that sends
# more is answered by closing the connection (we never need a response's body).
MAX_RESPONSE_BYTES = 64 * 1024
# What a failed socket or TLS operation raises: turned into an EndpointError by
# orchestrator.push.failures.transport_error.
TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


class Connector:
    """Opens the publishers' connections; one per ``up``. Shares one TLS context per CA bundle
    (loading a trust store takes milliseconds and about a megabyte)."""

    def __init__(self, send_timeout: float) -> None:
        self._socket_options = socket_options(send_timeout)
        self._contexts: dict[Path | None, ssl.SSLContext] = {}

    def ssl_context(self, ca_file: Path | None) -> ssl.SSLContext:
        """:func:`tls_context`, built once per CA bundle."""
        context = self._contexts.get(ca_file)
        if context is None:
            context = self._contexts[ca_file] = tls_context(ca_file)
        return context

    async def connect(self, target: Target, ca_file: Path | None, within: float) -> HttpConnection:
        """A new connection to ``target`` (TCP, then TLS for https), within ``within`` seconds.

        Raises EndpointError if it cannot be made. Cancellation: a half-made connection is closed."""
        context = self.ssl_context(ca_file) if target.tls else None
        stream: trio.abc.Stream | None = None
        try:
            with trio.move_on_after(within):
                tcp, raw = await _open_tcp(target.host, target.port, self._socket_options)
                stream = tcp
                if context is not None:
                    stream = trio.SSLStream(tcp, context, server_hostname=target.host, https_compatible=True)
                    await stream.do_handshake()
                return HttpConnection(target, stream, tcp.socket, None if context is not None else raw)
            raise timed_out(target.url, "connect", within)
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, TRANSPORT_ERRORS):
                raise transport_error(target.url, exc) from exc
            raise


class HttpConnection:
    """HTTP/1.1 requests and their responses, one at a time, on one connection (h11 does the framing).

    One task may send (``send_head``, ``send_chunk``, ``end_body``) while another receives
    (``receive_response``): trio streams allow one of each at a time, TLS included. Every method
    raises :class:`~orchestrator.errors.EndpointError` on a transport failure or a deadline.
    """

    def __init__(self, target: Target, stream: trio.abc.Stream, sock: Any, raw: socket.socket | None = None) -> None:
        self.target = target
        self.socket = sock  # the TCP socket (trio), for SIOCOUTQ and its descriptor
        self._stream = stream
        self._raw = raw  # the same socket, non-blocking, for plain TCP: see send_chunk
        self._h11 = h11.Connection(h11.CLIENT)

    async def send_head(self, headers: Sequence[tuple[str, str]], *, content_length: int | None,
                        within: float) -> None:  # fmt: skip
        """The request line and headers of a POST; a chunked body unless ``content_length``."""
        fields = [("Host", self.target.host_header), *headers]
        if content_length is None:
            fields.append(("Transfer-Encoding", "chunked"))
        else:
            fields.append(("Content-Length", str(content_length)))
        data = self._h11.send(h11.Request(method="POST", target=self.target.path, headers=fields))
        await self._send(data, within)

    async def send_chunk(self, data: bytes, within: float, *, checkpoint: bool = True) -> None:
        """``data`` as one chunk of the body, written within ``within`` seconds.

        The hot path of ``up`` (thousands of chunks a second). Over plain TCP the chunk's size
        line, the data and the CRLF first go to the kernel in one ``sendmsg`` from here, without
        copying the fragment and without a deadline, which is all a chunk needs while the
        socket's buffer has room (nearly always); only what does not fit waits for the socket,
        within the deadline. Then a checkpoint, so that a publisher catching up on a backlog lets
        the others run between its fragments; a caller that has just waited for this chunk (and
        so let the others run) passes ``checkpoint=False`` and saves a task switch per chunk."""
        pieces = self._h11.send_with_data_passthrough(h11.Data(data=data))
        assert pieces is not None  # a Data event always gives its framing
        sent = 0
        if self._raw is not None:
            try:
                sent = self._raw.sendmsg(pieces)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise transport_error(self.target.url, exc) from exc
            if sent == sum(map(len, pieces)):
                if checkpoint:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.checkpoint_if_cancelled()  # a cancel point, no task switch
                return
        await self._send(memoryview(b"".join(pieces))[sent:], within)  # one write: size line, data, CRLF

    async def end_body(self, within: float) -> None:
        """The end of the body: the zero-length chunk (or nothing, for a Content-Length body)."""
        data = self._h11.send(h11.EndOfMessage())
        if data:
            await self._send(data, within)

    async def _send(self, data: bytes | memoryview | None, within: float) -> None:
        assert data is not None  # h11 returns bytes for every event we send
        with trio.move_on_after(within):
            try:
                await self._stream.send_all(data)
            except TRANSPORT_ERRORS as exc:
                raise transport_error(self.target.url, exc) from exc
            return
        raise timed_out(self.target.url, "write", within)

    async def receive_response(self) -> Response:
        """Read the response (status line, headers, and a body up to ``MAX_RESPONSE_BYTES``,
        discarded). No deadline of its own: the caller sets one, or reads for the life of a
        POST to learn at once that the server answered or closed the connection.

        Raises EndpointError if the connection ends or breaks first, or the response is not
        HTTP/1.1. Cancellation: nothing to clean up (the caller closes the connection)."""
        response: h11.Response | None = None
        received = 0
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise EndpointError(self.target.url, f"the server's response is not valid HTTP/1.1: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except TRANSPORT_ERRORS as exc:
                    raise transport_error(self.target.url, exc) from exc
                received += len(data)
                if received > MAX_RESPONSE_BYTES:
                    raise EndpointError(self.target.url, f"the server's response is over {MAX_RESPONSE_BYTES} bytes")
                self._h11.receive_data(bytes(data))
                if not data and response is not None:
                    break  # a body delimited by the end of the connection
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like: the real answer follows
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                if response is None:
                    raise EndpointError(self.target.url, "the server closed the connection without answering")
                break
        if response is None:  # pragma: no cover - h11 yields a Response before EndOfMessage
            raise EndpointError(self.target.url, "no response")
        return Response(response.status_code, response.reason.decode("latin-1"))

    def unacked_bytes(self) -> int:
        """Bytes in the TCP socket's send queue the peer has not acknowledged (SIOCOUTQ)."""
        return unacked_bytes(self.socket)

    def reusable(self) -> bool:
        """Both sides have finished their message and neither said ``Connection: close`` (nor
        sent HTTP/1.0, nor ended a body by closing): h11's keep-alive rules."""
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def next_request(self, target: Target) -> bool:
        """Ready for another request, to ``target`` (same scheme, host and port), if the connection
        still can carry one. Between requests a server sends nothing; if the socket has anything
        to read (the end of the connection, a TLS close_notify, a ``408``), the server is done
        with it, and a request sent anyway would fail: so False, and the caller opens a new
        connection, without a failure. (A server closing at this very moment still wins the
        race: that request then fails and is resent like any other.)"""
        same_origin = (target.tls, target.host, target.port) == (self.target.tls, self.target.host, self.target.port)
        if not same_origin or not self.reusable() or self._h11.trailing_data != (b"", False) or readable(self.socket):
            return False
        self._h11.start_next_cycle()
        self.target = target
        return True

    async def aclose(self) -> None:
        """Close at once (no TLS close_notify wait). Cancellation: closes anyway."""
        await trio.aclose_forcefully(self._stream)


def readable(sock: Any) -> bool:
    """The socket has something to read, has been closed by the peer or has an error, now (poll
    with no timeout: select's descriptor limit of 1,024 is far below a process's connections).
    A socket closed on our side counts as readable (it cannot be used)."""
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def unacked_bytes(sock: Any) -> int:
    """Bytes in the socket's send queue the peer has not acknowledged (Linux ``SIOCOUTQ``, the
    same ioctl number as ``TIOCOUTQ``); 0 where unsupported or once the socket is gone."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return 0


async def _open_tcp(
    host: str, port: int, options: Sequence[tuple[int, int, int]]
) -> tuple[trio.SocketStream, socket.socket]:
    """A TCP connection to the first of ``host``'s addresses that accepts, with ``options`` set
    before connecting; also the stdlib socket under the trio one (the same descriptor), which
    :meth:`HttpConnection.send_chunk` writes to directly. (trio's ``open_tcp_stream`` does not
    hand that socket out.) Raises OSError with the last address's error."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host}: no address to connect to")
    for family, kind, proto, _name, address in infos:
        raw = socket.socket(family, kind, proto)
        try:
            raw.setblocking(False)
            for level, option, value in options:
                raw.setsockopt(level, option, value)
            sock = trio.socket.from_stdlib_socket(raw)
            await sock.connect(address)
        except OSError as exc:
            raw.close()
            error = exc
            continue
        except BaseException:
            raw.close()
            raise
        return trio.SocketStream(sock), raw
    raise error


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The client TLS context: httpx's default trust (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` if set,
    else certifi's bundle) plus, if given, the endpoint's ``ca_file`` as an *extra* bundle.
    Verification is always on; a profile can only add CAs to trust, never replace or disable them.
    Raises OSError/ssl.SSLError if the bundle cannot be read."""
    context = httpx.create_ssl_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def socket_options(send_timeout: float) -> list[tuple[int, int, int]]:
    """TCP_NODELAY, and TCP_USER_TIMEOUT (Linux): a connection whose sent data stays
    unacknowledged for the send timeout is dropped by the kernel. That is how a real black hole
    (a dead link, a firewall dropping packets) surfaces even when our writes still fit in the
    socket buffer."""
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout * 1000)))
    return options
