"""A TLS verification failure reaches the publisher's log with its reason (issue 13: it was
logged as ``connection failed: ConnectError: `` with nothing after it)."""

from __future__ import annotations

import logging
import ssl

import pytest
import trio
import trustme
from publisherkit import LIMITS, K
from rig import DEMO

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.publisher import Publisher, PublisherSettings
from orchestrator.push.reconnect import RetryPolicy


async def test_certificate_failure_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator.push.publisher")
    stranger = trustme.CA()  # the server's CA, which the client does not trust
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger.issue_cert("127.0.0.1").configure_cert(server_context)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            pass  # the client refused the certificate: what this test wants
        finally:
            await trio.aclose_forcefully(stream)

    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    board = HeaderBoard("primary", "video")
    board.announce(source.header)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_ssl_over_tcp_listeners(0, server_context, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        endpoint = Endpoint(name="tls", region="test", url=f"https://127.0.0.1:{port}/live/demo.isml")
        queue = EndpointOutbox(LIMITS)
        publisher = Publisher(
            group="primary", stream_id="video", endpoint=endpoint, header=board,
            outbox=queue, metrics=Metrics(), settings=PublisherSettings(retry=RetryPolicy()))  # fmt: skip
        for fragment in source.fragment(K):
            queue.push(fragment)  # work to do: the publisher probes, and the handshake fails
        nursery.start_soon(publisher.run)
        with trio.fail_after(10):
            # Two failures: the second retry waits (0.5 s), so the cancellation below finds
            # the publisher asleep, not mid-handshake (httpcore leaves a socket to the garbage
            # collector when cancelled there).
            while publisher.state.failures < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert "CERTIFICATE_VERIFY_FAILED" in publisher.state.last_error
    failed = [r.getMessage() for r in caplog.records if "CERTIFICATE_VERIFY_FAILED" in r.getMessage()]
    assert failed, [r.getMessage() for r in caplog.records]
    assert "certificate verify failed" in failed[0]
