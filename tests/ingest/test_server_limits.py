"""The ingest server over real sockets against hostile or broken clients (issue 13): a write that
fails, a body that never comes, too many connections, no file descriptors left, fields no
writer can carry. Each answer is 200 or a 4xx/5xx with a one-line reason, never a traceback."""

from __future__ import annotations

import logging
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from ingestkit import INGEST, Media, Server, chunks, status_of, video_track, wait_for_status
from receiverkit import hostile_fragment, trun

from orchestrator.fmp4 import boxes
from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.ops.httpserve import ConnectionStats, serve_asgi


async def test_a_write_that_fails_mid_fragment_is_cut_back_and_the_resend_archived(
    server: Server, media: Media
) -> None:
    """A real short write: RLIMIT_FSIZE lets half of fragment 1 reach the disk, then EFBIG. The
    answer is 500 without the archive's absolute path; the file keeps whole fragments only; the
    encoder's resend of fragment 1 is archived, not dropped as a duplicate."""
    path = server.archive / "live/demo/video/video.mp4"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    async def body() -> AsyncIterator[bytes]:
        yield media.header + media.fragments[0]
        await wait_for_status(server.url, lambda s: video_track(s)["fragments_archived"] == 1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + len(media.fragments[1]) // 2, limits[1]))
        yield media.fragments[1]

    try:
        async with httpx.AsyncClient() as client:
            response = await client.post(server.url + INGEST, content=body())
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            assert response.status_code == 500
            assert response.text == "archive write failed: File too large\n"
            assert str(server.archive.parent) not in response.text
            assert path.read_bytes() == media.init + media.fragments[0]  # cut back: no half fragment
            resend = await client.post(server.url + INGEST, content=chunks(media.header, *media.fragments[:3]))
            assert resend.status_code == 200
            status = await status_of(client, server.url)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == media.init + b"".join(media.fragments[:3])
    assert (video_track(status)["fragments_archived"], video_track(status)["duplicates_dropped"]) == (3, 1)


async def test_a_post_that_sends_no_body_is_answered_408(nursery: trio.Nursery, tmp_path: Path) -> None:
    app = IngestApp(tmp_path / "archive", body_timeout=0.5)
    host, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(f"POST {INGEST} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".encode())
    with trio.fail_after(10):
        answer = b""
        while not answer.endswith(b"timeout)\n") and (chunk := await stream.receive_some()):
            answer += chunk
    await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b"\r\n\r\nno body bytes for 0.5 s (the body timeout)\n")
    assert app.point.status(posts=True)["post_log"][0]["status"] == "error"
    assert app.refusals == {"408": 1}


async def test_connections_over_the_cap_are_answered_503_and_logged_once(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, media: Media
) -> None:
    """Every slot in real use (three POSTs streaming their body: nothing to evict): a new
    connection is answered 503 and closed, logged once for the episode."""
    caplog.set_level(logging.INFO, logger="orchestrator.ops.httpserve")
    app = IngestApp(tmp_path / "archive")
    host, uncapped = await nursery.start(serve_app, app, "127.0.0.1", 0)
    # serve_app's default cap is 512; this server has a cap of 3, on the same app.
    stats = ConnectionStats()
    host, port = await nursery.start(lambda task_status: serve_asgi(app, host, 0, "capped", max_connections=3,
                                                                    stats=stats, task_status=task_status))  # fmt: skip
    idle = []
    for k in range(3):
        busy = await trio.open_tcp_stream(host, port)
        await busy.send_all(f"POST /live/demo.isml/Streams(s{k}) HTTP/1.1\r\nhost: x\r\n"
                            f"transfer-encoding: chunked\r\n\r\n{len(media.header):x}\r\n".encode()
                            + media.header + b"\r\n")  # fmt: skip
        idle.append(busy)
    await wait_for_status(f"http://{host}:{uncapped}", lambda s: s["posts"]["active"] == 3)
    answers = []
    for _ in range(5):
        extra = await trio.open_tcp_stream(host, port)
        await extra.send_all(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
        with trio.fail_after(5):
            answer = b""
            while chunk := await extra.receive_some():
                answer += chunk
        answers.append(answer)
        await extra.aclose()
    assert all(a.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") for a in answers), answers
    assert all(a.endswith(b"too many open connections to this server; retry later\n") for a in answers)
    capped = [r.getMessage() for r in caplog.records if ".connections.capped" in r.getMessage()]
    assert capped == ["capped.connections.capped max_connections=3 action=new connections are answered 503 and "
                      "closed until some close"]  # fmt: skip
    await idle.pop().aclose()
    async with httpx.AsyncClient() as client:
        with trio.fail_after(5):
            while True:  # the server sees the close a moment later
                try:
                    if (await client.get(f"http://{host}:{port}/status")).status_code == 200:
                        break
                except httpx.RemoteProtocolError:
                    pass
                await trio.sleep(0.05)
    cleared = [r.getMessage() for r in caplog.records if ".connections.cap_cleared" in r.getMessage()]
    (line,) = cleared  # the five above, and any attempt of the loop that came before the server saw the close
    match = re.fullmatch(r"capped\.connections\.cap_cleared open_connections=2 refused=(\d+)", line)
    assert match is not None, line
    assert int(match[1]) >= 5
    assert stats.refused == int(match[1])
    assert stats.max_connections == 3
    assert (stats.evicted_idle, stats.evicted_no_body) == (0, 0)
    for stream in idle:
        await stream.aclose()


def test_running_out_of_file_descriptors_is_logged_once_and_recovers(tmp_path: Path) -> None:
    """A real EMFILE: the server runs with a 40-file limit and 60 connections arrive. One log
    line for the episode (it logged ten a second before), one when it recovers, and it serves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", "--listen", f"127.0.0.1:{port}", "--archive",
         str(tmp_path / "archive"), "--max-connections", "1000"],
        stderr=subprocess.PIPE, text=True, preexec_fn=limit_files,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
        time.sleep(1.5)  # the accept loop hits EMFILE and retries every 100 ms meanwhile
        for client in clients:
            client.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/status", timeout=2)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=20)
    assert server.returncode == 0, stderr
    assert stderr.count("ingest.accept.fd_exhausted error=EMFILE") == 1, stderr
    assert stderr.count("ingest.accept.recovered") == 1, stderr
    assert "Too many open files" not in stderr  # trio's own ten-a-second log line
    assert response.json()["connections"]["fd_exhausted_episodes"] == 1


@pytest.mark.parametrize(
    ("name", "body_of", "code", "reason"),
    [
        ("a thousand truns", lambda m: m.header + hostile_fragment([trun(1, 100)] * 1000, bytes(100)), 400,
         "over the limit of 16"),
        ("zero-size samples", lambda m: m.header + hostile_fragment([trun(50_000, 0)], bytes(200_000)), 400,
         "over the limit (one per mdat byte, 10000 in all)"),
        ("composition offset 2^31", lambda m: m.header + hostile_fragment(
            [boxes.full_box(b"trun", 0, 0xB01, (1).to_bytes(4, "big") + bytes(4) + (3000).to_bytes(4, "big")
                            + (8).to_bytes(4, "big") + (2**31).to_bytes(4, "big"))], bytes(8)), 400,
         "composition offset 2147483648, over the limit"),
    ],
)  # fmt: skip
async def test_hostile_bodies_get_a_400_with_the_limit_and_the_stream_goes_on(
    server: Server, media: Media, name: str, body_of: object, code: int, reason: str
) -> None:
    assert callable(body_of)
    async with httpx.AsyncClient() as client:
        response = await client.post(server.url + INGEST, content=body_of(media))
        assert response.status_code == code, name
        assert reason in response.text, response.text
        assert response.text.count("\n") == 1  # one line, no traceback
        ok = await client.post(server.url + INGEST, content=chunks(media.header, *media.fragments[:2]))
        assert ok.status_code == 200
    assert (server.archive / "live/demo/video/video.mp4").read_bytes() == media.init + b"".join(media.fragments[:2])


async def test_a_pubpoint_path_that_would_collide_with_a_track_file_is_refused(server: Server, media: Media) -> None:
    async with httpx.AsyncClient() as client:
        ok = await client.post(server.url + INGEST, content=chunks(media.header, media.fragments[0]))
        clash = await client.post(server.url + "/live/demo/video/video.mp4.isml/Streams(x)", content=media.header)
    assert ok.status_code == 200
    assert clash.status_code == 400
    assert "ends in .mp4, which names track files in the archive" in clash.text
    assert (server.archive / "live/demo/video/video.mp4").is_file()


async def test_memory_budget_over_http_answers_503_with_retry_after(nursery: trio.Nursery, tmp_path: Path,
                                                                    media: Media) -> None:  # fmt: skip
    from orchestrator.ingest.receiver import PublishingPoint

    app = IngestApp(tmp_path / "archive", point=PublishingPoint(memory_budget=1024 * 1024))
    host, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
    url = f"http://{host}:{port}"
    moof_end = media.fragments[0].index(b"mdat") - 4

    async def holding() -> AsyncIterator[bytes]:
        yield media.header + media.fragments[0][:moof_end] + (900_000).to_bytes(4, "big") + b"mdat"
        await trio.sleep_forever()

    async with httpx.AsyncClient() as client, trio.open_nursery() as posts:
        posts.start_soon(lambda: client.post(url + INGEST, content=holding()))
        await wait_for_status(url, lambda s: s["memory"]["reserved"] >= 900_000)
        opening = media.header + media.fragments[0][:moof_end] + (200_000).to_bytes(4, "big") + b"mdat"
        refused = await client.post(url + "/live/demo.isml/Streams(audio)", content=opening)
        posts.cancel_scope.cancel()
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert "over the ingest memory budget of 1048576 bytes; retry later" in refused.text
    assert app.point.status()["memory"]["refusals"] == 1
    assert app.refusals["503"] == 1
