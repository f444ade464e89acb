"""A publishing point that answers while the POST body is still being sent (a refusal mid-stream)
ends the POST at once, with the server's status, over plain HTTP and over TLS; the publisher
rewinds, reconnects, and the fragment is not lost.

The peer is a raw trio server (h11 for parsing) so the test controls exactly when the answer
goes out: after the first fragment of the first POST, with the connection left open (a peer that
closes would be noticed anyway; one that answers and waits used to be noticed only over plain
HTTP, and without its status)."""

from __future__ import annotations

import ssl

import h11
import pytest
import trio
import trustme
from publisherkit import LIMITS, K
from rig import DEMO

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile
from orchestrator.push.connection import Connector
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.publisher import Publisher, PublisherSettings
from orchestrator.push.reconnect import RetryPolicy


class RefuseFirstPost:
    """Answers probes 200; answers the first POST 503 once its first fragment arrived (and keeps
    the connection open); records the fragments each later POST delivers completely."""

    def __init__(self, header_size: int, fragment_size: int) -> None:
        self.header_size, self.fragment_size = header_size, fragment_size
        self.posts = 0
        self.refused_at: float | None = None
        self.delivered: list[int] = []  # body bytes of each POST that ended normally
        self.done = trio.Event()

    async def handle(self, stream: trio.abc.Stream) -> None:
        connection = h11.Connection(h11.SERVER)
        body = 0
        chunked = False
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    connection.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    chunked = any(name == b"transfer-encoding" for name, _ in event.headers)
                    if chunked:
                        self.posts += 1
                elif isinstance(event, h11.Data):
                    body += len(event.data)
                    if chunked and self.posts == 1 and body >= self.header_size + self.fragment_size:
                        self.refused_at = trio.current_time()
                        await stream.send_all(
                            connection.send(
                                h11.Response(
                                    status_code=503, headers=[("Content-Length", "0")], reason=b"Service Unavailable"
                                )
                            )
                        )
                        await stream.send_all(connection.send(h11.EndOfMessage()))
                        await trio.sleep_forever()  # answered; the connection stays open
                elif isinstance(event, h11.EndOfMessage):
                    if chunked:
                        self.delivered.append(body)
                        self.done.set()
                    await stream.send_all(
                        connection.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                    )
                    await stream.send_all(connection.send(h11.EndOfMessage()))
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_an_answer_during_the_body_ends_the_post_at_once_with_its_status(tls: bool, tmp_path) -> None:
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    first, second = source.fragment(K)[0], source.fragment(K + 1)[0]
    server = RefuseFirstPost(len(source.header.data), len(first.data))
    board = HeaderBoard("primary", "video")
    board.announce(source.header)
    queue = EndpointOutbox(LIMITS)
    # A long idle timeout and a next fragment 2 s away: only the answer can end the first POST soon.
    settings = PublisherSettings(idle_timeout=60.0, retry=RetryPolicy(base=0.05, cap=0.05, jitter=0.0))
    async with trio.open_nursery() as nursery:
        if tls:
            ca = trustme.CA()
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(server_context)
            (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
            listeners = await trio.open_ssl_over_tcp_listeners(0, server_context, host="127.0.0.1")
            port = listeners[0].transport_listener.socket.getsockname()[1]
            endpoint = Endpoint(name="refusing", region="test", url=f"https://127.0.0.1:{port}/live/demo.isml",
                                ca_file=tmp_path / "ca.pem")  # fmt: skip
        else:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            endpoint = Endpoint(name="refusing", region="test", url=f"http://127.0.0.1:{port}/live/demo.isml")
        nursery.start_soon(trio.serve_listeners, server.handle, listeners)
        metrics = Metrics()
        publisher = Publisher(group="primary", stream_id="video", endpoint=endpoint, header=board, outbox=queue,
                              metrics=metrics, settings=settings,
                              connector=Connector(settings.send_timeout))  # fmt: skip
        queue.push(first)
        nursery.start_soon(publisher.run)
        with trio.fail_after(10):
            while publisher.state.failures < 1:
                await trio.sleep(0.01)
        noticed = trio.current_time()
        queue.push(second)
        queue.close()
        with trio.fail_after(10):
            await server.done.wait()
        nursery.cancel_scope.cancel()
    assert server.refused_at is not None
    assert noticed - server.refused_at < 0.5  # at once, not at the next fragment (2 s) or the idle timeout (60 s)
    assert "503" in (publisher.state.last_error or "")
    labels = {"stream": "video", "group": "primary", "endpoint": "refusing", "endpoint_region": "test"}
    assert metrics.registry.get_sample_value("orchestrator_post_failures_total", {**labels, "reason": "server"}) == 1
    # The refused POST's fragment went again, before the next one: nothing lost.
    assert server.delivered == [len(source.header.data) + len(first.data) + len(second.data)]
