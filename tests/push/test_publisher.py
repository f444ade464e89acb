"""The publisher against a real HTTP peer on loopback: probe, chunked POST, clean end, errors.

The peer here is a small recording ASGI app (served by hypercorn, as the ingest server is) so
each test can see exactly what went over the wire; the real ingest server is the peer in
tests/test_integration.py.
"""

from __future__ import annotations

import logging
import socket

import pytest
import trio
from publisherkit import LIMITS, K
from rig import DEMO

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.httpserve import serve_asgi
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.publisher import Publisher, PublisherSettings
from orchestrator.push.reconnect import RetryPolicy


class Recorder:
    """Records each request: method, path, headers, body chunks; answers ``status``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.changed = trio.Event()

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        record = {"method": scope["method"], "path": scope["path"], "headers": dict(scope["headers"]),
                  "chunks": [], "complete": False}  # fmt: skip
        self.requests.append(record)
        status = self.status
        if status == 200:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                if message.get("body"):
                    record["chunks"].append(message["body"])
                    self._notify()
                if not message.get("more_body"):
                    record["complete"] = True
                    break
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate, timeout=10.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()


def start_publisher(nursery: trio.Nursery, publisher: Publisher) -> trio.Event:
    """Run ``publisher`` in ``nursery``; the event is set when its ``run()`` returns (which it
    does by itself once its outbox is closed and drained)."""
    returned = trio.Event()

    async def run() -> None:
        await publisher.run()
        returned.set()

    nursery.start_soon(run)
    return returned


async def push_one_fragment_and_end(recorder, returned, queue, source, *, already_queued=False):
    """Queue one fragment, see it arrive in a POST body, then end the stream cleanly."""
    if not already_queued:
        queue.push(source.fragment(K)[0])
    await recorder.wait_for(lambda: any(len(r["chunks"]) >= 2 for r in recorder.requests))
    queue.close()
    with trio.fail_after(5):
        await returned.wait()
    assert recorder.requests[-1]["complete"]


@pytest.fixture
def profile():
    return load_profile(DEMO)


def endpoint_at(port: int) -> Endpoint:
    return Endpoint(name="local", region="test", url=f"http://127.0.0.1:{port}/live/demo.isml")


def labels(group="primary"):
    return {"stream": "video", "group": group, "endpoint": "local", "endpoint_region": "test"}


def make_publisher(profile, port, queue, metrics, retry=None, settings=None):
    source = SyntheticStream(profile, profile.streams[0])
    board = HeaderBoard("primary", "video")
    board.announce(source.header)
    publisher = Publisher(
        group="primary", stream_id="video", endpoint=endpoint_at(port), header=board,
        outbox=queue, metrics=metrics,
        settings=settings or PublisherSettings(retry=retry or RetryPolicy()))  # fmt: skip
    return publisher, source


async def test_probe_then_chunked_post_with_header_then_fragments(profile):
    recorder = Recorder()
    metrics = Metrics()
    queue = EndpointOutbox(LIMITS)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, recorder, "127.0.0.1", 0, "recorder")
        publisher, source = make_publisher(profile, port, queue, metrics)
        returned = start_publisher(nursery, publisher)
        fragments = [f for k in range(K, K + 3) for f in source.fragment(k)]
        for fragment in fragments:
            queue.push(fragment)
        await recorder.wait_for(lambda: len(recorder.requests) == 2 and len(recorder.requests[1]["chunks"]) >= 4)
        assert publisher.state.connected
        assert metrics.registry.get_sample_value("orchestrator_endpoint_up", labels()) == 1
        queue.close()  # end of stream: the POST must end cleanly
        await recorder.wait_for(lambda: recorder.requests[1]["complete"])
        nursery.cancel_scope.deadline = trio.current_time() + 5
        # run() returns by itself once the queue is closed and drained; then stop the server.
        with trio.fail_after(5):
            await returned.wait()
        nursery.cancel_scope.cancel()

    probe, post = recorder.requests
    assert probe["headers"].get(b"connection") == b"close"  # so the POST always opens a new connection
    assert post["headers"].get(b"connection") != b"close"
    assert probe["method"] == "POST"
    assert probe["path"] == "/live/demo.isml/Streams(video)"
    assert probe["chunks"] == []
    assert probe["headers"].get(b"content-length") == b"0"
    assert post["path"] == "/live/demo.isml/Streams(video)"
    assert post["headers"].get(b"transfer-encoding") == b"chunked"
    assert post["headers"].get(b"x-encoder-group") == b"primary"
    body = b"".join(post["chunks"])
    assert body == source.header.data + b"".join(f.data for f in fragments)
    assert post["complete"]
    assert metrics.registry.get_sample_value("orchestrator_fragments_pushed_total", labels()) == 3
    assert metrics.registry.get_sample_value("orchestrator_posts_opened_total", labels()) == 1
    assert metrics.registry.get_sample_value("orchestrator_last_pushed_fragment_index", labels()) == K + 2
    assert metrics.registry.get_sample_value("orchestrator_bytes_pushed_total", labels()) == len(body)
    assert metrics.registry.get_sample_value("orchestrator_endpoint_up", labels()) == 0


@pytest.mark.parametrize(("status", "reason", "message"), [
    (401, "unauthorized", "publisher.unauthorized"),
    (403, "unauthorized", "publisher.unauthorized"),
    (404, "not_found", "publisher.not_found"),
    (503, "server", "publisher.post.failed"),
])  # fmt: skip
async def test_refusing_endpoint_is_named_counted_and_retried(profile, caplog, status, reason, message):
    caplog.set_level(logging.INFO, logger="orchestrator.push.publisher")
    recorder = Recorder()
    recorder.status = status
    metrics = Metrics()
    queue = EndpointOutbox(LIMITS)
    fast = RetryPolicy(base=0.01, cap=0.02, slow=0.05, jitter=0.0)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, recorder, "127.0.0.1", 0, "recorder")
        publisher, source = make_publisher(profile, port, queue, metrics, retry=fast)
        queue.push(source.fragment(K)[0])
        returned = start_publisher(nursery, publisher)
        await recorder.wait_for(lambda: len(recorder.requests) >= 3)
        # The endpoint is fixed: the publisher notices on its next retry and streams.
        recorder.status = 200
        await push_one_fragment_and_end(recorder, returned, queue, source, already_queued=True)
        nursery.cancel_scope.cancel()

    failures = metrics.registry.get_sample_value("orchestrator_post_failures_total", {**labels(), "reason": reason})
    assert failures >= 3
    assert any(message in r.getMessage() and f"status={status}" in r.getMessage() for r in caplog.records)
    assert metrics.registry.get_sample_value("orchestrator_fragments_pushed_total", labels()) == 1


async def test_unreachable_endpoint_is_retried_until_it_appears(profile):
    # Reserve a port, close it: connections are refused until the recorder starts there.
    probe_socket = trio.socket.socket()
    await probe_socket.bind(("127.0.0.1", 0))
    port = probe_socket.getsockname()[1]
    probe_socket.close()
    recorder = Recorder()
    metrics = Metrics()
    queue = EndpointOutbox(LIMITS)
    fast = RetryPolicy(base=0.01, cap=0.05, jitter=0.0)
    async with trio.open_nursery() as nursery:
        publisher, source = make_publisher(profile, port, queue, metrics, retry=fast)
        queue.push(source.fragment(K)[0])
        returned = start_publisher(nursery, publisher)
        with trio.fail_after(5):
            while publisher.state.failures < 3:
                await trio.sleep(0.01)
        await nursery.start(serve_asgi, recorder, "127.0.0.1", port, "recorder")
        await push_one_fragment_and_end(recorder, returned, queue, source, already_queued=True)
        nursery.cancel_scope.cancel()
    transport = metrics.registry.get_sample_value(
        "orchestrator_post_failures_total", {**labels(), "reason": "transport"}
    )
    assert transport >= 3
    assert metrics.registry.get_sample_value("orchestrator_fragments_pushed_total", labels()) == 1


async def test_a_broken_post_that_carried_new_fragments_is_retried_at_once_even_after_failures(profile):
    """Two failed attempts have built up a backoff (1.5 s); then a POST works and carries a new
    fragment before the connection is reset: that was a working connection, so the publisher
    reconnects at once instead of waiting out the backoff."""
    from orchestrator.testing.faultproxy import Fault, FaultProxy

    recorder = Recorder()
    recorder.status = 503
    metrics = Metrics()
    queue = EndpointOutbox(LIMITS)
    backoff = RetryPolicy(base=1.5, cap=1.5, jitter=0.0)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, recorder, "127.0.0.1", 0, "recorder")
        proxy = FaultProxy(("127.0.0.1", port))
        _, proxy_port = await nursery.start(proxy.run)
        publisher, source = make_publisher(profile, proxy_port, queue, metrics, retry=backoff)
        fragment = source.fragment(K)[0]
        queue.push(fragment)
        nursery.start_soon(publisher.run)
        await recorder.wait_for(lambda: len(recorder.requests) >= 2)  # two refused probes
        recorder.status = 200
        whole = len(source.header.data) + len(fragment.data)
        await recorder.wait_for(
            lambda: len(recorder.requests) >= 4 and sum(map(len, recorder.requests[3]["chunks"])) >= whole
        )
        await trio.sleep(0.1)  # the publisher counts it pushed once its write completed
        assert publisher.state.failures == 2
        seen = len(recorder.requests)
        reset_at = trio.current_time()
        proxy.set_fault(Fault.RESET)
        await recorder.wait_for(lambda: len(recorder.requests) > seen, timeout=5)
        retried_after = trio.current_time() - reset_at
        nursery.cancel_scope.cancel()
    assert publisher.state.failures == 3
    assert retried_after < 0.75, f"retried {retried_after:.2f} s after a working POST broke (backoff is 1.5 s)"


@pytest.mark.parametrize(("seconds", "send", "idle"), [(2, 3.0, 6.0), (6, 9.0, 18.0)])
def test_production_timeouts_are_derived_from_the_fragment_duration(profile, seconds, send, idle):
    """What ``up`` runs with when no test overrides it (spec 7.1, 7.2, 7.6): connect 10 s, send
    1.5 x D, idle 3 x D, the final response 10 s; and the publisher's connections use the send
    timeout as TCP_USER_TIMEOUT."""
    from orchestrator.supervisor import UpOptions, _Planned

    settings = PublisherSettings.for_fragment_duration(seconds)
    assert (settings.connect_timeout, settings.send_timeout, settings.idle_timeout, settings.response_timeout) == (
        10.0, send, idle, 10.0)  # fmt: skip
    assert settings.retry == RetryPolicy()
    text = DEMO.read_text().replace("fragment_duration = 2 ", f"fragment_duration = {seconds} ")
    from orchestrator.profile import parse_profile

    planned = _Planned(parse_profile(text, "demo.toml"), UpOptions(), Metrics())
    assert planned.settings == settings
    publisher, _ = make_publisher(profile, 1, EndpointOutbox(LIMITS), Metrics(), settings=settings)
    assert publisher.settings == settings
    assert (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send * 1000)) in publisher.connector._socket_options


async def test_publisher_connections_carry_tcp_user_timeout_equal_to_the_send_timeout():
    """A real connection made by the connector ``up`` builds: the kernel drops it when sent data
    stays unacknowledged for the send timeout (how a real black hole surfaces)."""
    from orchestrator.push.connection import Connector, Target

    recorder = Recorder()
    connector = Connector(PublisherSettings.for_fragment_duration(2).send_timeout)  # what up builds
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, recorder, "127.0.0.1", 0, "recorder")
        connection = await connector.connect(Target.parse(f"http://127.0.0.1:{port}/x"), None, within=5)
        sock = connection.socket
        options = (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))  # fmt: skip
        await connection.send_head([], content_length=0, within=5)
        response = await connection.receive_response()
        await connection.aclose()
        nursery.cancel_scope.cancel()
    assert options == (3000, 1)
    assert response.status == 200
    assert recorder.requests[0]["path"] == "/x"


@pytest.mark.parametrize("swept", [False, True], ids=["own-sweeper", "shared-sweeper"])
async def test_a_post_with_nothing_to_send_is_ended_cleanly_and_the_next_fragment_opens_a_new_one(
        profile, caplog, swept):  # fmt: skip
    """Spec 7.6: after ``idle_timeout`` with nothing to send, the body is finished (zero-length
    chunk) and the response awaited; the next fragment opens a new probe and POST with the header.
    Not a failure: nothing counted, nothing resent. Both with the sweeper a publisher on its own
    runs for itself and with the process-wide :class:`IdleSweeper` that ``up`` shares."""
    from orchestrator.push.publisher import IdleSweeper

    caplog.set_level(logging.INFO, logger="orchestrator.push.publisher")
    recorder = Recorder()
    metrics = Metrics()
    queue = EndpointOutbox(LIMITS)
    settings = PublisherSettings(idle_timeout=0.5)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_asgi, recorder, "127.0.0.1", 0, "recorder")
        publisher, source = make_publisher(profile, port, queue, metrics, settings=settings)
        if swept:
            publisher.idle_sweeper = IdleSweeper(interval=0.1)
            nursery.start_soon(publisher.idle_sweeper.run)
        first, second = source.fragment(K)[0], source.fragment(K + 1)[0]
        queue.push(first)
        nursery.start_soon(publisher.run)
        await recorder.wait_for(lambda: len(recorder.requests) == 2 and recorder.requests[1]["complete"], timeout=5)
        assert b"".join(recorder.requests[1]["chunks"]) == source.header.data + first.data
        with trio.fail_after(5):
            while publisher.state.connected:
                await trio.sleep(0.01)
        queue.push(second)
        await recorder.wait_for(lambda: len(recorder.requests) == 4 and recorder.requests[3]["chunks"])
        queue.close()
        await recorder.wait_for(lambda: recorder.requests[3]["complete"])
        nursery.cancel_scope.cancel()
    probe, post = recorder.requests[2:]
    assert probe["chunks"] == []
    assert b"".join(post["chunks"]) == source.header.data + second.data
    assert any("publisher.post.ending" in r.getMessage() and "reason=idle" in r.getMessage() for r in caplog.records)
    value = metrics.registry.get_sample_value
    assert value("orchestrator_posts_opened_total", labels()) == 2
    assert value("orchestrator_post_failures_total", {**labels(), "reason": "transport"}) is None
    assert value("orchestrator_resent_fragments_total", labels()) is None
    assert value("orchestrator_reconnects_total", labels()) is None
    assert publisher.state.failures == 0


def test_unacked_bytes_reads_what_the_send_queue_holds_for_a_peer_that_does_not_read():
    """The measure the publisher feeds to the outbox's unconfirmed window (Linux SIOCOUTQ)."""
    import socket

    from orchestrator.push.connection import unacked_bytes as _unacked_bytes

    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with sender, peer:
            assert _unacked_bytes(sender) == 0
            sender.setblocking(False)
            written = 0
            try:
                while written < 50_000_000:
                    written += sender.send(b"x" * 65536)
            except BlockingIOError:
                pass  # the peer's receive buffer and our send queue are full
            queued = _unacked_bytes(sender)
            assert 0 < queued < written  # the rest sits, acknowledged, in the peer's receive buffer
        assert _unacked_bytes(sender) == 0  # closed: nothing to measure
