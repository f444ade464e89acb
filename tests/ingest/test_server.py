"""The ingest server over real HTTP on loopback: chunked POSTs from two groups, probes, refusals,
fault injection, a client that goes away, and the archive read back by ffprobe."""

from __future__ import annotations

import gc
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from ingestkit import (
    A_STOPS,
    FRAGMENTS,
    FRAME,
    FRAMES_PER_FRAGMENT,
    INGEST,
    Media,
    Server,
    chunks,
    halves,
    status_of,
    video_track,
    wait_for_status,
)

from orchestrator.fmp4 import boxes
from orchestrator.ingest.receiver import DEFAULT_MEMORY_BUDGET
from orchestrator.ingest.server import run_ingest_server, serve_ingest
from orchestrator.wire import smooth


async def test_two_groups_post_the_same_fragments_and_one_copy_of_each_is_archived(
    tmp_path: Path, media: Media
) -> None:
    archive, stop = tmp_path / "archive", trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(partial(serve_ingest, "127.0.0.1", 0, archive, shutdown_event=stop))
            url = f"http://{host}:{port}"
            async with httpx.AsyncClient() as client:

                async def post(group: str, parts: list[bytes]) -> None:
                    response = await client.post(
                        url + INGEST, content=chunks(*parts), headers={"X-Encoder-Group": group}
                    )
                    assert (response.status_code, response.text) == (200, "")

                # Both groups send the same bytes, B in other chunks (as TCP may); A's encoder
                # stops after fragment 5, so B alone carries 6..9.
                group_b = [*halves(media.header)] + [half for f in media.fragments for half in halves(f)]
                async with trio.open_nursery() as posts:
                    posts.start_soon(post, "A", [media.header, *media.fragments[:A_STOPS]])
                    posts.start_soon(post, "B", group_b)
                status = await status_of(client, url)
            stop.set()

    assert video_track(status) == {
        "name": "video",
        "file": "live/demo/video/video.mp4",
        "timescale": 90000,
        "fragments_received": A_STOPS + FRAGMENTS,
        "fragments_archived": FRAGMENTS,
        "duplicates_dropped": A_STOPS,
        "conflicts": 0,
        "rejected": 0,
        "gaps": 0,
        "negative_times": 0,
        "first_index": 0,
        "last_index": FRAGMENTS - 1,
        "last_timestamp": (FRAGMENTS - 1) * FRAMES_PER_FRAGMENT * FRAME,
    }
    assert status["posts"] == {"total": 2, "active": 0}
    assert status["publishing_points"]["live/demo"]["streams"]["video"]["header_mismatches"] == 0
    log = sorted(status["post_log"], key=lambda p: p["encoder_group"])
    assert [(p["encoder_group"], p["status"], p["reason"], p["fragments_seen"]) for p in log] == [
        ("A", "ok", None, A_STOPS),
        ("B", "ok", None, FRAGMENTS),
    ]
    outcomes = {p["encoder_group"]: [f["outcome"] for f in p["fragments"]] for p in log}
    assert sorted(outcomes["A"] + outcomes["B"]) == ["archived"] * FRAGMENTS + ["duplicate"] * A_STOPS
    assert outcomes["B"][A_STOPS:] == ["archived"] * (FRAGMENTS - A_STOPS)
    # Whichever group was first for each fragment, the file is the init plus each fragment once, in order.
    assert (archive / "live/demo/video/video.mp4").read_bytes() == media.init + b"".join(media.fragments)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="needs ffprobe: apt-get install ffmpeg (see README)")
async def test_archived_track_is_read_by_ffprobe(server: Server, media: Media) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(server.url + INGEST, content=chunks(media.header, *media.fragments))
        assert response.status_code == 200
    path = server.archive / "live/demo/video/video.mp4"
    with trio.fail_after(10):
        done = await trio.run_process(
            ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
             "stream=codec_name,width,height,nb_read_frames", "-of", "json", str(path)],
            capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
    (stream,) = json.loads(done.stdout)["streams"]
    assert stream == {
        "codec_name": "h264",
        "width": 192,
        "height": 108,
        "nb_read_frames": str(FRAGMENTS * FRAMES_PER_FRAGMENT),
    }


async def test_empty_probe_answers_200_at_once(server: Server) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(server.url + INGEST, content=b"", headers={"X-Encoder-Group": "A"})
        assert (response.status_code, response.headers["content-length"]) == (200, "0")
        status = await status_of(client, server.url)
    assert (status["probes"], status["posts"]["total"]) == (1, 0)


@pytest.mark.parametrize(
    "path",
    ["/live/%2E%2E/demo.isml/Streams(video)", "/live/demo.isml/Streams(..)", "/live/demo.isml/Streams(a%2Fb)"],
)
async def test_unsafe_path_answers_400(server: Server, media: Media, path: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(server.url + path, content=chunks(media.header, media.fragments[0]))
        assert response.status_code == 400
        assert "unsafe name" in response.text
        assert (await status_of(client, server.url))["posts"]["total"] == 0
    assert not server.archive.exists()


async def test_fail_mode_answers_every_post_without_reading_it(server: Server, media: Media) -> None:
    async with httpx.AsyncClient() as client:
        server.app.fail_with = 401
        probe = await client.post(server.url + INGEST, content=b"")
        stream = await client.post(server.url + INGEST, content=chunks(media.header, media.fragments[0]))
        assert (probe.status_code, stream.status_code) == (401, 401)
        server.app.fail_with = 503
        assert (await client.post(server.url + INGEST, content=b"")).status_code == 503
        server.app.fail_with = None
        assert (await client.post(server.url + INGEST, content=b"")).status_code == 200
        status = await status_of(client, server.url)
    assert (status["probes"], status["posts"]["total"]) == (1, 0)


async def test_client_gone_mid_body_keeps_what_was_archived(server: Server, media: Media) -> None:
    class Cut(Exception):
        pass

    async def body() -> AsyncIterator[bytes]:
        yield media.header
        yield media.fragments[0]
        yield media.fragments[1]
        yield media.fragments[2][:100]
        await wait_for_status(server.url, lambda s: video_track(s)["fragments_archived"] == 2)
        raise Cut

    with trio.fail_after(10):
        async with httpx.AsyncClient() as client:
            with pytest.raises(Cut):
                await client.post(server.url + INGEST, content=body(), headers={"X-Encoder-Group": "A"})
        status = await wait_for_status(server.url, lambda s: s["post_log"][0]["status"] != "active")

    (post,) = status["post_log"]
    assert (post["status"], post["reason"]) == ("disconnected", "the client went away mid-body")
    assert [f["index"] for f in post["fragments"]] == [0, 1]
    assert status["posts"]["active"] == 0
    path = server.archive / "live/demo/video/video.mp4"
    assert path.read_bytes() == media.init + media.fragments[0] + media.fragments[1]


async def test_broken_header_answers_400_with_the_reason(server: Server, media: Media) -> None:
    moov_first = smooth.write_ftyp() + boxes.write_moov([media.track])
    async with httpx.AsyncClient() as client:
        response = await client.post(server.url + INGEST, content=chunks(moov_first, *media.fragments[:2]))
        assert response.status_code == 400
        assert response.text == "moov arrived before the Live Server Manifest box (ftyp, manifest, moov)\n"
        (post,) = (await status_of(client, server.url))["post_log"]
    assert (post["status"], post["fragments_seen"]) == ("error", 0)


async def test_other_routes(server: Server) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(server.url + "/")).status_code == 404
        assert (await client.post(server.url + "/live/demo.isml")).status_code == 404
        wrong_method = await client.get(server.url + INGEST)
        assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
        assert (await client.post(server.url + "/status")).status_code == 405
        status = await status_of(client, server.url)
        assert "post_log" not in (await client.get(server.url + "/status")).json()
    assert status == {"posts": {"total": 0, "active": 0}, "probes": 0, "publishing_points": {}, "post_log": [],
                      "memory": {"budget": DEFAULT_MEMORY_BUDGET, "reserved": 0, "refusals": 0}, "tolerated": {},
                      "connections": {"max_connections": 512, "open": 1, "refused": 0, "fd_exhausted_episodes": 0,
                                      "evicted_idle": 0, "evicted_no_body": 0},
                      "refusals": {}, "limits": {},  # the one connection of this client; 404 and 405 are not refusals
                      "cmaf": {"counts": {}, "tracks": 0, "segment_durations": {}, "posts": {"total": 0, "active": 0},
                               "probes": 0,
                               "publishing_points": {}, "post_log": [], "tolerated": {},
                               "memory": {"budget": DEFAULT_MEMORY_BUDGET, "reserved": 0, "refusals": 0}}}  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_run_ingest_server_exits_0_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    code = (
        "import logging, sys; from pathlib import Path; from orchestrator.ingest.server import run_ingest_server; "
        "logging.basicConfig(level=logging.INFO); run_ingest_server('127.0.0.1:0', Path(sys.argv[1]))"
    )
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-c", code, str(tmp_path)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # run_process reaps the child and closes its pipe whatever happens here.
            run = partial(trio.run_process, argv, cwd=root, stderr=subprocess.PIPE, check=False)
            process: trio.Process = await nursery.start(run)
            assert process.stderr is not None
            output = b""
            while (match := re.search(rb"ingest\.listening url=(http://\S+)", output)) is None:
                chunk = await process.stderr.receive_some()
                assert chunk, output.decode()
                output += chunk
            async with httpx.AsyncClient() as client:
                assert (await client.get(match[1].decode() + "/status")).status_code == 200
            process.send_signal(signum)
            assert await process.wait() == 0


def test_run_ingest_server_raises_oserror_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken, warnings.catch_warnings():
        # hypercorn does not close the socket whose bind failed; let it go quietly, here.
        warnings.simplefilter("ignore", ResourceWarning)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            run_ingest_server(f"127.0.0.1:{taken.getsockname()[1]}", tmp_path)
        gc.collect()


def test_run_ingest_server_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host:port"):
        run_ingest_server("8080", tmp_path)


def test_archive_from_an_earlier_run_is_moved_aside_never_truncated(tmp_path):
    from orchestrator.ingest.receiver import ArchiveWrite
    from orchestrator.ingest.server import ArchiveFiles

    path = tmp_path / "live" / "demo" / "video" / "v.mp4"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"first run")
    (path.parent / "v.1.mp4").write_bytes(b"second run")
    files = ArchiveFiles(tmp_path)
    files.write(ArchiveWrite(("live", "demo", "video", "v.mp4"), b"init", True))
    files.write(ArchiveWrite(("live", "demo", "video", "v.mp4"), b"frag", False))
    files.close()
    assert path.read_bytes() == b"initfrag"
    assert (path.parent / "v.1.mp4").read_bytes() == b"second run"
    assert (path.parent / "v.2.mp4").read_bytes() == b"first run"
