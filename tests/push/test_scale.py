"""More than 100 POSTs open at once from one process (not timed).

httpx ignores a client's ``limits`` when it is given a transport, so a shared client once capped
the whole process at 100 connections: POST 101 and later waited for a pool slot forever. The
publishers now open one connection per request themselves; here 150 of them, with the connector
``up`` gives them, push to one loopback counting sink, and every one of their POSTs must be open
at the same time and carry its fragment.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import trio

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile
from orchestrator.push.connection import Connector
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import Publisher, PublisherSettings
from orchestrator.testing.countsink import CountSink

DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo.toml"
K = 14_080_000
PUBLISHERS = 150


async def test_150_posts_open_at_once_from_one_process():
    profile = load_profile(DEMO)
    source = SyntheticStream(profile, profile.streams[0])
    fragment = source.fragment(K)[0]
    settings = PublisherSettings(idle_timeout=600.0)  # the POSTs stay open until the outboxes close
    connector = Connector(settings.send_timeout)  # one for the process, as up builds it
    sink = CountSink()
    metrics = Metrics()
    limits = OutboxLimits(max_seconds=Fraction(60), max_bytes=1 << 20)
    with trio.fail_after(120):  # a hang guard, not a performance bound
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(sink.serve, "127.0.0.1", 0)
            endpoint = Endpoint(name="local", region="test", url=f"http://127.0.0.1:{port}/live/demo.isml")
            outboxes = []
            async with trio.open_nursery() as publishers:
                for i in range(PUBLISHERS):
                    board = HeaderBoard("primary", f"s{i}")
                    board.announce(source.header)
                    outbox = EndpointOutbox(limits)
                    outbox.push(fragment)
                    publisher = Publisher(connector=connector, group="primary", stream_id=f"s{i}", endpoint=endpoint,
                                          header=board, outbox=outbox, metrics=metrics, settings=settings)  # fmt: skip
                    outboxes.append(outbox)
                    publishers.start_soon(publisher.run)
                while sink.counts.fragments_total < PUBLISHERS:
                    await trio.sleep(0.05)
                # Every POST is open now, at the same time, and has delivered its fragment.
                assert sink.counts.open_posts == PUBLISHERS
                for outbox in outboxes:
                    outbox.close()
            nursery.cancel_scope.cancel()
    targets = {target for target, *_ in sink.counts.fragments}
    assert targets == {f"/live/demo.isml/Streams(s{i})" for i in range(PUBLISHERS)}
    assert sink.counts.max_open_posts == PUBLISHERS
    assert sink.counts.open_posts == 0  # every POST ended cleanly
    assert sum(metrics.registry.get_sample_value("orchestrator_fragments_pushed_total",
               {"stream": f"s{i}", "group": "primary", "endpoint": "local", "endpoint_region": "test"})
               for i in range(PUBLISHERS)) == PUBLISHERS  # fmt: skip
