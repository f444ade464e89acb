"""The counting sink: a cheap HTTP/1.1 server that reads ingest POSTs and counts their fragments.

For benchmarks and scale tests, where the real ingest server (which checks, de-duplicates and
archives every fragment) would be the thing measured. One trio task per connection feeds the
bytes to :class:`~orchestrator.testing.bodyscan.RequestScanner`; every fragment seen is recorded
as ``(request target, X-Encoder-Group, mfhd sequence number, tfdt, arrival time in ns since
the Unix epoch)``, the arrival being when its last byte was read. Every request is answered
``200`` with an empty body once its body has ended (a probe at once), so publishers see a
normal publishing point.

``GET /report`` answers the counts as JSON: POSTs open now, most open at once, requests and
fragments seen, and the fragment records (``?clear=1`` also forgets the records).

Run in its own process (``python -m orchestrator.testing.countsink``), it prints one JSON line
``{"host": ..., "port": ...}`` once listening, and serves until killed or its stdin closes.

Cancellation: the listener and every connection close; nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import trio

from orchestrator.errors import ScanError
from orchestrator.testing.bodyscan import FragmentSeen, RequestEnded, RequestScanner, RequestStarted

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024


@dataclass
class Counts:
    open_posts: int = 0
    max_open_posts: int = 0
    requests: int = 0
    fragments: list[tuple[str, str | None, int, int | None, int]] = field(default_factory=list)
    fragments_total: int = 0
    bytes_total: int = 0

    def report(self, clear: bool) -> bytes:
        body = json.dumps({
            "open_posts": self.open_posts, "max_open_posts": self.max_open_posts, "requests": self.requests,
            "fragments_total": self.fragments_total, "bytes_total": self.bytes_total,
            "fragments": self.fragments,
        }).encode()  # fmt: skip
        if clear:
            self.fragments = []
        return body


class CountSink:
    def __init__(self) -> None:
        self.counts = Counts()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the bound (host, port)."""
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        bound = listeners[0].socket.getsockname()
        task_status.started((bound[0], bound[1]))
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        counts, scanner = self.counts, RequestScanner()
        target, group, in_post = "", None, False
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(RECV_SIZE)
                    if not data:
                        return
                    counts.bytes_total += len(data)
                    for event in scanner.feed(data):
                        if isinstance(event, FragmentSeen):
                            counts.fragments_total += 1
                            counts.fragments.append((target, group, event.sequence_number,
                                                     event.base_media_decode_time, time.time_ns()))  # fmt: skip
                        elif isinstance(event, RequestStarted):
                            counts.requests += 1
                            target, group = event.target, event.encoder_group
                            close = event.connection_close
                            if event.content_length is None:
                                in_post = True
                                counts.open_posts += 1
                                counts.max_open_posts = max(counts.max_open_posts, counts.open_posts)
                        elif isinstance(event, RequestEnded):
                            if in_post:
                                in_post = False
                                counts.open_posts -= 1
                            body = b""
                            url = urlsplit(target)
                            if url.path == "/report":
                                body = counts.report(clear="1" in parse_qs(url.query).get("clear", []))
                            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                            if close:
                                return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ScanError) as exc:
            log.debug("countsink.connection.dropped error=%s", exc)
        finally:
            if in_post:
                counts.open_posts -= 1


async def _main(host: str, port: int) -> None:
    sink = CountSink()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(sink.serve, host, port)
        print(json.dumps({"host": bound[0], "port": bound[1]}), flush=True)
        # Stop when the parent closes our stdin (or dies): never outlive the benchmark.
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        while await stdin.receive_some(1024):
            pass
        nursery.cancel_scope.cancel()


def _raise_open_files_limit() -> None:
    """One descriptor per POST: take all the hard limit allows (a profile of 1,000 streams opens 4,000)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    _raise_open_files_limit()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    trio.run(_main, args.host, args.port)


if __name__ == "__main__":
    main()
