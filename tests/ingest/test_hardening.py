"""The ingest server faces the network (issue 20): the weak spots issue 20 measured, each over
real sockets against the real server, and each limit naming itself in the answer, the log and
the ``orchestrator_ingest_limit_hits_total`` metric.

Every test here fails on the server as it was before issue 20 (docs/ingest-field.md says how
that was checked): idle sockets and body-less POSTs held the connection cap until they timed out
(a good client's POST was answered 503), ``/status?posts=1`` rendered every entry of every
POST's log (6.1 s and 30 MiB when full), a header mismatch was counted and never logged, and
the server had no ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import httpx
import pytest
import trio
from ingestkit import INGEST, Media, Server, chunks, video_track
from prometheus_client.parser import text_string_to_metric_families
from receiverkit import header, smil

from orchestrator.ingest.receiver import FRAGMENT_LOG_SIZE, POST_LOG_SIZE, FragmentInfo, PublishingPoint, StreamPath
from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.ops.httpserve import DEFAULT_NO_BODY_GRACE

CAP = 32


async def capped_server(nursery: trio.Nursery, tmp_path: Path) -> Server:
    app = IngestApp(tmp_path / "archive")
    host, port = await nursery.start(lambda task_status: serve_app(app, "127.0.0.1", 0, max_connections=CAP,
                                                                   task_status=task_status))  # fmt: skip
    return Server(app, f"http://{host}:{port}", tmp_path / "archive")


async def read_all(stream: trio.SocketStream, timeout: float = 5.0, into: list[bytes] | None = None) -> bytes:
    """What the server sent until it closed the connection (or ``timeout`` passed)."""
    answer = b""
    with trio.move_on_after(timeout):
        while chunk := await stream.receive_some():
            answer += chunk
    if into is not None:
        into.append(answer)
    return answer


def limit_hits(metrics_text: str) -> dict[tuple[str, str], float]:
    """``orchestrator_ingest_limit_hits_total`` by (limit, action), read with prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "orchestrator_ingest_limit_hits_total":
                found[(sample.labels["limit"], sample.labels["action"])] = sample.value
    return found


async def good_post(server: Server, media: Media) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(server.url + INGEST, content=chunks(media.header, *media.fragments[:3]))


async def test_idle_sockets_do_not_lock_a_good_client_out(
    nursery: trio.Nursery, tmp_path: Path, media: Media, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten times the cap in sockets that never send a byte, then a real encoder's POST: it is
    served at once (before issue 20 it was answered 503 until the idle ones timed out, 75 s).
    The oldest idle sockets were answered 408 naming the limit and closed to make room."""
    caplog.set_level(logging.WARNING, logger="orchestrator.ops.httpserve")
    server = await capped_server(nursery, tmp_path)
    host, port = server.url.removeprefix("http://").split(":")
    idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(10 * CAP)]
    response = await good_post(server, media)  # accepted after them all (the listen queue is first come)
    assert response.status_code == 200, response.text
    assert server.app.connections.evicted_idle >= 9 * CAP  # each evicted an older one
    assert video_track(server.app.point.status())["fragments_archived"] == 3
    first = await read_all(idle[0])
    assert first.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert first.endswith(b"this connection sent no request while the server is at its connection cap "
                          b"(max_connections): closed to make room; reconnect when you have something "
                          b"to send\n")  # fmt: skip
    assert server.app.connections.refused == 0
    assert any("ingest.connections.evicted reason=idle" in r.getMessage() for r in caplog.records)
    async with httpx.AsyncClient() as client:
        hits = limit_hits((await client.get(server.url + "/metrics")).text)
    assert hits[("max_connections", "evicted_idle")] >= 9 * CAP + 1
    for stream in idle:
        await stream.aclose()


async def test_posts_that_send_no_body_do_not_lock_a_good_post_out(
    nursery: trio.Nursery, tmp_path: Path, media: Media
) -> None:
    """Twice the cap in POSTs that send their head and never a body byte: the cap fills with
    them. Once they have waited the grace (2 s) for a first body byte, a good POST takes the
    oldest one's slot and is served; before issue 20 it was answered 503 until the body timeout
    (60 s)."""
    server = await capped_server(nursery, tmp_path)
    host, port = server.url.removeprefix("http://").split(":")
    head = f"POST {INGEST} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".encode()
    silent = []
    for _ in range(2 * CAP):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(head)
        silent.append(stream)
    with trio.fail_after(10):
        while server.app.point.status()["posts"]["active"] < CAP:
            await trio.sleep(0.01)
    await trio.sleep(DEFAULT_NO_BODY_GRACE + 0.2)
    response = await good_post(server, media)
    assert response.status_code == 200, response.text
    assert video_track(server.app.point.status())["fragments_archived"] == 3
    assert server.app.connections.evicted_no_body >= 1
    answers: list[bytes] = []
    async with trio.open_nursery() as readers:  # those not evicted never answer: read all at once, 1 s
        for stream in silent:
            readers.start_soon(lambda s=stream: read_all(s, 1.0, answers))  # type: ignore[misc]
    no_body = [a for a in answers if b"sent no body bytes" in a]
    assert len(no_body) == server.app.connections.evicted_no_body
    assert all(a.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for a in no_body)
    assert all(b"while the server is at its connection cap (max_connections)" in a for a in no_body)
    for stream in silent:
        await stream.aclose()


def full_post_log(point: PublishingPoint) -> None:
    """The per-POST log as full as it gets: POST_LOG_SIZE records of FRAGMENT_LOG_SIZE entries
    (what 200 closed POSTs of 1,000 fragments leave; filled directly, which is 200,000 times
    faster than sending them)."""
    for k in range(POST_LOG_SIZE):
        post = point.open_post(StreamPath(("live",), f"s{k}"), None, float(k))
        record = post._record
        record.fragments.extend((FragmentInfo(1, n, n * 3000, 3000), "archived") for n in range(FRAGMENT_LOG_SIZE))
        record.fragments_seen = FRAGMENT_LOG_SIZE
        post.close(k + 1.0, "ok")


async def test_status_with_full_post_logs_stays_small(server: Server) -> None:
    """``/status?posts=1`` with every POST log full: the newest 50 POSTs, the last 100 fragments
    of each (it was all 200,000 entries: 6.1 s and 30 MiB); ``?post=<id>`` gives one whole."""
    full_post_log(server.app.point)
    async with httpx.AsyncClient() as client:
        listed = await client.get(server.url + "/status?posts=1")
        most = await client.get(server.url + "/status?posts=1&limit=1000")
        one = await client.get(server.url + f"/status?post={POST_LOG_SIZE}")
        bad = await client.get(server.url + "/status?posts=1&limit=many")
    log = listed.json()["post_log"]
    assert (len(log), {len(p["fragments"]) for p in log}) == (50, {100})
    assert {p["fragments_not_listed"] for p in log} == {FRAGMENT_LOG_SIZE - 100}
    assert len(listed.content) < 2_000_000, len(listed.content)
    assert len(most.json()["post_log"]) == POST_LOG_SIZE  # the limit is capped at the log's size
    assert len(most.content) < 8_000_000, len(most.content)
    (whole,) = one.json()["post_log"]
    assert (whole["id"], len(whole["fragments"])) == (POST_LOG_SIZE, FRAGMENT_LOG_SIZE)
    assert (bad.status_code, bad.text) == (400, "limit and post take whole numbers\n")


async def test_a_header_mismatch_is_logged(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator.ingest.server")
    async with httpx.AsyncClient() as client:
        for creator in ("primary", "backup"):
            response = await client.post(server.url + INGEST, content=header(manifest=smil({1: "video"}, creator)),
                                         headers={"x-encoder-group": creator})  # fmt: skip
            assert response.status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if "header_mismatch" in r.getMessage()]
    assert line.startswith("ingest.stream.header_mismatch stream=/live/demo.isml/Streams(video) group=backup "
                           "mismatches=1 ")  # fmt: skip


@pytest.mark.parametrize(
    ("limit", "status", "body"),
    [
        ("max_moof_size", 400, header() + struct.pack(">I4s", 100 * 1024 * 1024, b"moof")),
        ("max_header_box_size", 400, struct.pack(">I4s", 2 * 1024 * 1024, b"ftyp")),
        ("memory_budget", 503, header() + struct.pack(">I4s", 1024, b"moof") + bytes(1016)
         + struct.pack(">I4s", 2 * 1024 * 1024, b"mdat")),
        ("body_timeout", 408, None),
    ],
)  # fmt: skip
async def test_each_limit_names_itself_in_the_answer_the_log_and_the_metric(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, limit: str, status: int,
    body: bytes | None
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="orchestrator.ingest.server")
    app = IngestApp(tmp_path / "archive", point=PublishingPoint(memory_budget=1024 * 1024), body_timeout=0.5)
    host, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
    url = f"http://{host}:{port}"
    if body is None:  # the header, then nothing: a raw socket, as httpx reads no answer before its body is sent
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(f"POST {INGEST} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                              f"{len(header()):x}\r\n".encode() + header() + b"\r\n")  # fmt: skip
        answer = await read_all(stream)
        await stream.aclose()
        code, text = int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[1].decode()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        if body is not None:
            response = await client.post(INGEST, content=body)
            code, text = response.status_code, response.text
        metrics = await client.get("/metrics")
        state = (await client.get("/status")).json()
    assert code == status
    assert limit in text or limit.replace("_", " ") in text, text
    assert f"ingest.limit.exceeded limit={limit} status={status} " in "\n".join(r.getMessage() for r in caplog.records)
    assert limit_hits(metrics.text)[(limit, "refused")] == 1
    assert state["limits"] == {limit: 1}
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_metrics_count_what_the_status_counts(server: Server, media: Media) -> None:
    assert (await good_post(server, media)).status_code == 200
    async with httpx.AsyncClient() as client:
        text = (await client.get(server.url + "/metrics")).text
    samples = {(s.name, json.dumps(s.labels, sort_keys=True)): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    labels = {"format": "smooth", "publishing_point": "live/demo", "stream": "video", "track": "1"}
    assert samples[("orchestrator_ingest_fragments_total",
                    json.dumps({**labels, "outcome": "archived"}, sort_keys=True))] == 3  # fmt: skip
    assert samples[("orchestrator_ingest_gaps", json.dumps(labels, sort_keys=True))] == 0
    assert samples[("orchestrator_ingest_posts_total", json.dumps({"format": "smooth"}))] == 1
