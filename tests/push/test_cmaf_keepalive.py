"""CMAF keep-alive over real loopback sockets: one connection per track and endpoint, counted by a
server that sees the TCP connections, and by the client side (the bound: never two at once per
publisher). Servers that close every connection, or close idle ones, lose nothing and get no
extra headers; a connection reset through the fault proxy resends the header, then the forward
buffer. TLS connections are reused as well.

No timing assertions: each test waits for what it needs and counts."""

from __future__ import annotations

import ssl
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio
import trustme
from publisherkit import LIMITS, TWO_TRACKS, K
from rig import DEMO

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile, parse_profile
from orchestrator.push.cmafroute import Reboxer, add_cmaf_publishers
from orchestrator.push.connection import Connector
from orchestrator.push.fanout import FanOut
from orchestrator.push.publisher import Publisher, PublisherSettings
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.push.transport import Target
from orchestrator.testing.faultproxy import Fault, FaultProxy
from orchestrator.wire import cmaf

SETTINGS = PublisherSettings(connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
                             segment_connect_timeout=2.0, keepalive_timeout=30.0,
                             retry=RetryPolicy(base=0.1, cap=0.5, slow=2.0, jitter=0.0))  # fmt: skip


@dataclass
class Seen:
    connection: int  # which accepted connection it came on (1: the first)
    path: str
    body: bytes


class CountingServer:
    """An HTTP/1.1 server (h11 over trio, TLS if given a context) that records every complete
    request with the TCP connection it came on, and answers 200. ``close_every_response``: each
    answer says ``Connection: close`` and the connection is closed. :meth:`close_idle` closes
    every connection waiting for its next request, as a server's keep-alive timeout does (its
    client sees a FIN, no answer); on demand rather than on a timer, so that a test is not a race
    between the server's timer and the client's next request."""

    def __init__(self, *, close_every_response: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.close_every_response = close_every_response
        self.tls = tls
        self._idle: set[trio.CancelScope] = set()
        self.requests: list[Seen] = []
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.idle_closed = 0
        self.port = 0
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Cancellation: the listener and every connection close."""
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(await trio.open_tcp_listeners(0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
        if self.tls is not None:
            listeners = [trio.SSLListener(listener, self.tls) for listener in listeners]  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def wait_for(self, predicate: Callable[[], bool], seconds: float = 30.0) -> None:
        with trio.fail_after(seconds):
            while not predicate():
                await self._changed.wait()

    def close_idle(self) -> None:
        for scope in self._idle:
            scope.cancel()

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.accepted += 1
        number = self.accepted
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._change()
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = None, b""
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        if request is None and connection.their_state is h11.IDLE:  # between requests
                            with trio.CancelScope() as idle:
                                self._idle.add(idle)
                                try:
                                    connection.receive_data(await stream.receive_some(65536))
                                finally:
                                    self._idle.discard(idle)
                            if idle.cancelled_caught:
                                self.idle_closed += 1
                                return
                            continue
                        connection.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:  # ConnectionClosed: the client is done with this connection
                        return
                assert request is not None
                self.requests.append(Seen(number, request.target.decode(), body))
                headers = [("Content-Length", "0")]
                if self.close_every_response:
                    headers.append(("Connection", "close"))
                await stream.send_all(connection.send(h11.Response(status_code=200, headers=headers)))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                self._change()
                if connection.our_state is not h11.DONE:
                    return  # MUST_CLOSE: Connection: close said by either side
                connection.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return  # reset by the client or the proxy
        finally:
            self.open -= 1
            self._change()
            await trio.aclose_forcefully(stream)

    def connections_of(self, track: str) -> list[int]:
        return sorted({r.connection for r in self.requests if f"/{track}/" in r.path})


class CountingConnector:
    """The real :class:`Connector`, counting per track (read from the first request's path) the
    connections open at once on the publisher's side: the bound is checked where it is kept."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.open: dict[str, int] = defaultdict(int)
        self.most_open: dict[str, int] = defaultdict(int)
        self.opened: dict[str, int] = defaultdict(int)

    async def connect(self, target: Target, ca_file: Path | None, within: float) -> _Counted:
        track = target.path.decode().split("/")[-2]
        connection = await self.connector.connect(target, ca_file, within)
        self.opened[track] += 1
        self.open[track] += 1
        self.most_open[track] = max(self.most_open[track], self.open[track])
        return _Counted(connection, self, track)


class _Counted:
    def __init__(self, connection: object, counter: CountingConnector, track: str) -> None:
        self._connection = connection
        self._counter = counter
        self._track = track
        self._closed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._connection, name)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._counter.open[self._track] -= 1
        await self._connection.aclose()  # type: ignore[attr-defined]


class Source:
    """The demo's video stream (and, with ``two_tracks``, an audio track), re-boxed as CMAF: what
    the publishers get, and the bytes each request must carry."""

    def __init__(self, two_tracks: bool = False) -> None:
        profile = parse_profile(TWO_TRACKS) if two_tracks else load_profile(DEMO)
        stream = profile.streams[0]
        self.source = SyntheticStream(profile, stream)
        self.names = ["video_360p", "audio_eng"] if two_tracks else ["video_360p"]
        self.tracks = list(zip(profile.track_ids(stream), self.names, strict=True))
        self.reboxer = Reboxer(profile.presentation.epoch_ns)
        segmenter = cmaf.Segmenter(profile.presentation.epoch_ns)
        headers = segmenter.track_headers(self.source.header)
        self.header = {name: headers[track_id][1].data for track_id, name in self.tracks}
        self.segments = {}
        for k in range(8):
            for fragment, (_, name) in zip(self.source.fragment(K + k), self.tracks, strict=True):
                self.segments[(name, k)] = segmenter.segment(fragment)

    def publishers(self, url: str, connector: object, metrics: Metrics, ca_file: Path | None = None,
                   settings: PublisherSettings = SETTINGS) -> tuple[FanOut, list[Publisher]]:  # fmt: skip
        target = Endpoint(name="local", region="test", url=url, format="cmaf", cmaf_paths="template", ca_file=ca_file)
        fanout = FanOut("primary", metrics)
        board = fanout.add_stream("video")
        board.announce(self.source.header)
        publishers = add_cmaf_publishers(fanout, board, self.tracks, target, reboxer=self.reboxer, limits=LIMITS,
                                         metrics=metrics, settings=settings, connector=connector)  # type: ignore[arg-type]  # fmt: skip
        return fanout, publishers

    def push(self, fanout: FanOut, k: int) -> None:
        for fragment in self.source.fragment(K + k):
            fanout.fragment(fragment)

    def expected(self, name: str, ks: range) -> list[tuple[str, bytes]]:
        base = f"/cmaf/video/{name}"
        return [(f"{base}/init.m4s", self.header[name])] + [(f"{base}/{K + k}.m4s", self.segments[(name, k)])
                                                            for k in ks]  # fmt: skip


def of_track(server: CountingServer, name: str) -> list[tuple[str, bytes]]:
    return [(r.path, r.body) for r in server.requests if f"/{name}/" in r.path]


def delivered(server: CountingServer, source: Source, k: int) -> Callable[[], bool]:
    """Every track's segment k has arrived (whole)."""
    return lambda: all((f"/cmaf/video/{name}/{K + k}.m4s", source.segments[(name, k)]) in of_track(server, name)
                       for name in source.names)  # fmt: skip


def metric(metrics: Metrics, name: str, track: str) -> float | None:
    labels = {"stream": f"video-{track}", "group": "primary", "endpoint": "local", "endpoint_region": "test"}
    return metrics.registry.get_sample_value(name, labels)


async def push_one_by_one(server: CountingServer, source: Source, fanout: FanOut, ks: range,
                          between: Callable[[int], object] | None = None) -> None:  # fmt: skip
    """Push segment after segment, each once the last has arrived (as a live encoder does, one
    segment duration apart); ``between(k)`` runs (awaited if it returns an awaitable) before k."""
    for k in ks:
        if between is not None:
            waited = between(k)
            if waited is not None:
                await waited  # type: ignore[misc]
        source.push(fanout, k)
        await server.wait_for(delivered(server, source, k))


async def test_n_segments_arrive_over_one_connection_per_track():
    source = Source(two_tracks=True)
    server = CountingServer()
    metrics = Metrics()
    connector = CountingConnector(Connector(SETTINGS.send_timeout))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        fanout, publishers = source.publishers(f"http://127.0.0.1:{server.port}/cmaf", connector, metrics)
        for publisher in publishers:
            nursery.start_soon(publisher.run)
        await push_one_by_one(server, source, fanout, range(8))
        nursery.cancel_scope.cancel()
    for name in source.names:
        assert of_track(server, name) == source.expected(name, range(8))  # each once, the header once
        assert len(server.connections_of(name)) == 1, name
        assert (connector.opened[name], connector.most_open[name]) == (1, 1)
        assert metric(metrics, "orchestrator_connections_opened_total", name) == 1
        assert metric(metrics, "orchestrator_posts_opened_total", name) == 9
    assert server.accepted == 2  # 18 requests over 2 TCP connections, one per track
    assert server.most_open == 2


async def test_a_server_answering_connection_close_every_time_gets_everything_once():
    source = Source()
    server = CountingServer(close_every_response=True)
    metrics = Metrics()
    connector = CountingConnector(Connector(SETTINGS.send_timeout))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        fanout, [publisher] = source.publishers(f"http://127.0.0.1:{server.port}/cmaf", connector, metrics)
        nursery.start_soon(publisher.run)
        await push_one_by_one(server, source, fanout, range(6))
        nursery.cancel_scope.cancel()
    assert of_track(server, "video_360p") == source.expected("video_360p", range(6))  # no loss, one header
    assert server.connections_of("video_360p") == list(range(1, 8))  # a new connection per request
    assert (connector.opened["video_360p"], connector.most_open["video_360p"]) == (7, 1)
    assert metric(metrics, "orchestrator_connections_opened_total", "video_360p") == 7
    assert publisher.state.failures == 0


async def test_a_server_closing_idle_connections_gets_everything_once():
    source = Source()
    server = CountingServer()
    metrics = Metrics()
    connector = CountingConnector(Connector(SETTINGS.send_timeout))

    async def after_the_server_closed(k: int) -> None:
        if k % 2 == 0 and k > 0:  # every other segment finds its connection closed by the server
            server.close_idle()
            await server.wait_for(lambda: server.open == 0)

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        fanout, [publisher] = source.publishers(f"http://127.0.0.1:{server.port}/cmaf", connector, metrics)
        nursery.start_soon(publisher.run)
        await push_one_by_one(server, source, fanout, range(7), after_the_server_closed)
        nursery.cancel_scope.cancel()
    assert of_track(server, "video_360p") == source.expected("video_360p", range(7))  # no loss, one header
    assert publisher.state.failures == 0  # seen closed before use: a new connection, not a failure
    assert connector.most_open["video_360p"] == 1
    # Closed before segments 2, 4 and 6: header, 0, 1 | 2, 3 | 4, 5 | 6.
    assert [r.connection for r in server.requests] == [1, 1, 1, 2, 2, 3, 3, 4]
    assert (server.idle_closed, connector.opened["video_360p"]) == (3, 4)


async def test_the_publisher_closes_its_kept_connection_after_the_keepalive_timeout():
    source = Source()
    server = CountingServer()
    connector = CountingConnector(Connector(SETTINGS.send_timeout))
    settings = PublisherSettings(**{**SETTINGS.__dict__, "keepalive_timeout": 0.05})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        fanout, [publisher] = source.publishers(f"http://127.0.0.1:{server.port}/cmaf", connector, Metrics(),
                                                settings=settings)  # fmt: skip
        nursery.start_soon(publisher.run)
        source.push(fanout, 0)
        await server.wait_for(delivered(server, source, 0))
        await server.wait_for(lambda: server.open == 0)  # the publisher closed it: the server saw the end
        assert connector.open["video_360p"] == 0
        source.push(fanout, 1)
        await server.wait_for(delivered(server, source, 1))
        nursery.cancel_scope.cancel()
    assert of_track(server, "video_360p") == source.expected("video_360p", range(2))
    assert [r.connection for r in server.requests] == [1, 1, 2]
    assert publisher.state.failures == 0


@pytest.mark.parametrize("fault", ["reset_mid_segment", "reset_while_idle"])
async def test_a_reset_through_the_fault_proxy_loses_nothing(fault):
    """Mid-segment: the request fails, so a new connection carries the header, then the forward
    buffer (the segments written last and the one that failed). While idle: the kept connection
    is seen dead before use and replaced; nothing failed, nothing is resent."""
    source = Source()
    server = CountingServer()
    metrics = Metrics()
    connector = CountingConnector(Connector(SETTINGS.send_timeout))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        proxy = FaultProxy(("127.0.0.1", server.port))
        host, port = await nursery.start(proxy.run)
        fanout, [publisher] = source.publishers(f"http://{host}:{port}/cmaf", connector, metrics)
        nursery.start_soon(publisher.run)
        await push_one_by_one(server, source, fanout, range(3))
        assert proxy.connections_accepted == 1
        if fault == "reset_mid_segment":
            proxy.set_fault(Fault.CLOSE_AFTER, close_after_bytes=400)  # past the request head, into the body
            source.push(fanout, 3)
            with trio.fail_after(30):
                while publisher.state.failures < 1:
                    await trio.sleep(0.01)
            proxy.heal()
        else:
            proxy.set_fault(Fault.RESET)
            await server.wait_for(lambda: server.open == 0)
            source.push(fanout, 3)
        await server.wait_for(delivered(server, source, 3))
        await push_one_by_one(server, source, fanout, range(4, 6))
        nursery.cancel_scope.cancel()
    sent = of_track(server, "video_360p")
    expected = source.expected("video_360p", range(6))
    if fault == "reset_mid_segment":
        # What got through whole: header, 0, 1, 2; then (segment 3 cut) header, 1, 2, 3; then 4, 5.
        # Whole: header, 0, 1, 2; then, segment 3 cut mid-body, the header again and the forward
        # buffer, the outbox's rule: at least the last two segments written (1, 2; here also the
        # unconfirmed ones) and 3; then 4, 5.
        assert sent[:5] == [*expected[:4], expected[0]]
        assert sent[5:] in (expected[1:], expected[2:])
        assert metric(metrics, "orchestrator_reconnects_total", "video_360p") >= 1
        assert metric(metrics, "orchestrator_resent_fragments_total", "video_360p") >= 2
    else:
        assert sent == expected
        assert publisher.state.failures == 0
    assert connector.most_open["video_360p"] == 1
    assert proxy.connections_accepted == connector.opened["video_360p"] >= 2


async def test_tls_connections_are_reused_as_well(tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    source = Source()
    server = CountingServer(tls=server_context)
    metrics = Metrics()
    connector = CountingConnector(Connector(SETTINGS.send_timeout))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        fanout, [publisher] = source.publishers(f"https://127.0.0.1:{server.port}/cmaf", connector, metrics,
                                                ca_file=ca_file)  # fmt: skip
        nursery.start_soon(publisher.run)
        await push_one_by_one(server, source, fanout, range(6))
        nursery.cancel_scope.cancel()
    assert of_track(server, "video_360p") == source.expected("video_360p", range(6))
    assert (server.accepted, connector.opened["video_360p"]) == (1, 1)  # 7 requests, one TLS handshake
