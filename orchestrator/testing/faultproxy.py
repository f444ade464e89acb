"""A TCP proxy that injects network faults on purpose, for tests, benchmarks and drills.

Theory of operation
-------------------
The proxy sits between a publisher and an ingest server, on loopback only. Each accepted
connection gets an upstream connection and two pumps (client to server, server to client)
under one cancel scope. :meth:`FaultProxy.set_fault` switches the behaviour at any moment:

* ``PASS``: forward both ways;
* ``REFUSE``: new connections are reset before any byte (existing ones keep passing);
* ``RESET``: every open connection is reset now; new ones pass;
* ``DOWN``: every open connection is reset now and new ones are refused (a server or link that
  goes down: the two steps must be one, since a publisher reconnects within milliseconds);
* ``BLACKHOLE``: connections, open and new, stop moving bytes either way while staying open,
  as a dead link or a firewall that drops packets does. The listening socket has a small
  receive buffer (inherited by accepted sockets), so a sender's writes stall after a few
  kilobytes instead of disappearing into megabytes of kernel buffer;
* ``STALL``: connections, open and new, stop being read while staying open, as a hung ingest
  process or a request-buffering L7 proxy does. Unlike ``BLACKHOLE`` this is meant for a proxy
  built with the kernel's default buffers (``receive_buffer=None``): the sender's writes keep
  landing in its send buffer and the proxy's receive buffer, hundreds of kilobytes on loopback,
  so a sender's write timeout never fires; only a later ``RESET`` (or ``heal``) ends them;
* ``DRIP``: client-to-server bytes are forwarded at ``drip_bytes_per_second`` at most;
* ``CLOSE_AFTER``: each connection is reset after ``close_after_bytes`` more client-to-server
  bytes (a middlebox that kills long connections).

:meth:`FaultProxy.heal` returns to ``PASS`` and resets black-holed and stalled connections: to their
client they are dead anyway, and the next connection must be a clean one.

A reset is an RST (``SO_LINGER`` on, timeout 0, then close), not a FIN: a clean FIN in the
middle of a chunked body reads, to some servers, like the end of a request.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import struct
from dataclasses import dataclass, field

import trio

from orchestrator.profile import is_loopback_host

log = logging.getLogger(__name__)

_CHUNK = 16 * 1024
_BLACKHOLE_RCVBUF = 4096


class Fault(enum.Enum):
    PASS = "pass"
    REFUSE = "refuse"
    RESET = "reset"
    DOWN = "down"
    BLACKHOLE = "blackhole"
    STALL = "stall"
    DRIP = "drip"
    CLOSE_AFTER = "close_after"


@dataclass(eq=False)
class _Connection:
    client: trio.SocketStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    upstream: trio.SocketStream | None = None
    frozen: bool = False
    reset: bool = False
    budget: int | None = None  # client-to-server bytes left before a reset (CLOSE_AFTER)


def _abort(stream: trio.SocketStream | None) -> None:
    """Close with an RST."""
    if stream is None:
        return
    with contextlib.suppress(OSError):  # already gone
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0), *,
                 receive_buffer: int | None = _BLACKHOLE_RCVBUF) -> None:  # fmt: skip
        """``receive_buffer``: SO_RCVBUF of the accepted sockets (small, so a black hole stalls a
        sender within kilobytes); None keeps the kernel's default and its autotuning."""
        for host, _ in (upstream, listen):
            if not is_loopback_host(host):
                raise ValueError(f"the fault proxy works on loopback only, not {host!r}")
        self.upstream = upstream
        self.listen = listen
        self.receive_buffer = receive_buffer
        self._address: tuple[str, int] | None = None
        self._fault = Fault.PASS
        self._drip_rate = 1000
        self._close_after = 0
        self._changed = trio.Event()
        self._connections: set[_Connection] = set()
        self.connections_accepted = 0
        self.connections_refused = 0
        self.connections_reset = 0
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("the proxy is not listening yet")
        return self._address

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def fault(self) -> Fault:
        return self._fault

    def set_fault(self, fault: Fault, *, drip_bytes_per_second: int = 1000, close_after_bytes: int = 0) -> None:
        log.info("faultproxy.fault fault=%s", fault.value)
        self._drip_rate = max(1, drip_bytes_per_second)
        self._close_after = max(0, close_after_bytes)
        if fault in (Fault.RESET, Fault.DOWN):
            for connection in list(self._connections):
                self._reset(connection)
            fault = Fault.PASS if fault is Fault.RESET else Fault.DOWN
        elif fault in (Fault.BLACKHOLE, Fault.STALL):
            for connection in self._connections:
                connection.frozen = True
        elif fault is Fault.CLOSE_AFTER:
            for connection in self._connections:
                connection.budget = self._close_after
        self._fault = fault
        self._changed.set()
        self._changed = trio.Event()

    def heal(self) -> None:
        for connection in list(self._connections):
            if connection.frozen:
                self._reset(connection)
            connection.budget = None
        self.set_fault(Fault.PASS)

    def _reset(self, connection: _Connection) -> None:
        connection.reset = True
        connection.scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and proxy connections until cancelled; reports the bound (host, port).

        Cancellation: the listener and every proxied connection are closed.
        """
        host, port = self.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        if self.receive_buffer is not None:
            for listener in listeners:
                listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        bound = listeners[0].socket.getsockname()
        self._address = (bound[0], bound[1])
        async with trio.open_nursery() as nursery:
            task_status.started(self._address)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        """One proxied connection. Cancellation: both sockets are reset."""
        self.connections_accepted += 1
        if self._fault in (Fault.REFUSE, Fault.DOWN):
            self.connections_refused += 1
            _abort(client)
            return
        connection = _Connection(client, frozen=self._fault in (Fault.BLACKHOLE, Fault.STALL))
        if self._fault is Fault.CLOSE_AFTER:
            connection.budget = self._close_after
        self._connections.add(connection)
        try:
            with connection.scope:
                try:
                    connection.upstream = await trio.open_tcp_stream(*self.upstream)
                except OSError:
                    connection.reset = True
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, connection, True, nursery.cancel_scope)
                    nursery.start_soon(self._pump, connection, False, nursery.cancel_scope)
        finally:
            self._connections.discard(connection)
            if connection.reset:
                self.connections_reset += 1
                _abort(client)
                _abort(connection.upstream)
            else:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                    if connection.upstream is not None:
                        await connection.upstream.aclose()

    async def _pump(self, connection: _Connection, to_server: bool, both: trio.CancelScope) -> None:
        """Copy one direction, applying the current fault. Cancellation: stops copying."""
        assert connection.upstream is not None
        source, sink = (
            (connection.client, connection.upstream) if to_server else (connection.upstream, connection.client)
        )
        try:
            while True:
                while connection.frozen:
                    await self._changed.wait()  # only heal() (a reset) ends a black hole or a stall
                data = await source.receive_some(_CHUNK)
                while connection.frozen:  # frozen while this read was pending: hold what it got
                    await self._changed.wait()
                if not data:
                    await sink.send_eof()
                    return
                if to_server:
                    await self._forward_to_server(connection, data)
                else:
                    await sink.send_all(data)
                    self.bytes_server_to_client += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            both.cancel()  # one side is gone: the connection is over

    async def _forward_to_server(self, connection: _Connection, data: bytes) -> None:
        assert connection.upstream is not None
        if connection.budget is not None and len(data) >= connection.budget:
            data = data[: connection.budget]
            await connection.upstream.send_all(data)
            self.bytes_client_to_server += len(data)
            self._reset(connection)
            await trio.lowlevel.checkpoint()
            return
        if connection.budget is not None:
            connection.budget -= len(data)
        if self._fault is Fault.DRIP:
            step = max(1, self._drip_rate // 20)  # twenty slices a second
            for offset in range(0, len(data), step):
                piece = data[offset : offset + step]
                await connection.upstream.send_all(piece)
                self.bytes_client_to_server += len(piece)
                await trio.sleep(len(piece) / self._drip_rate)
            return
        await connection.upstream.send_all(data)
        self.bytes_client_to_server += len(data)
