"""The confidence monitor in a real browser: headless Chromium loads ``/monitor`` from a real
``up`` (ffmpeg encoders) and from a real ingest server, and the tests read the DOM the page's
script drew: every group's tile, its states, the marks (a killed encoder, a frozen picture, a
group that encodes other content than the other, a peer that stopped). Each saves a screenshot
in its tmp_path."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import trio
from browserkit import CHROMIUM, dump_dom, make_clip, monitor_json, read_page, screenshot, tiles_of
from rig import (
    audio,
    build_profile,
    endpoint,
    ffmpeg,
    free_port,
    group,
    loopback_ingest,
    two_groups,
    up_in_process,
    video,
    wait_for,
    write_profile,
)

from orchestrator.encode.synthetic import SyntheticStream

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: apt-get install chromium (.ci/run installs it)"),
]

F = 2  # fragment duration, seconds
STREAMS = {"video": [video()], "audio": [audio()]}
CLIP_SECONDS, STILL_FROM = 16, 3  # the backup's clip: moving for 3 s, then a still picture
MARKED = {"restarted", "stale", "down", "unreachable"}  # what tells the operator a group is not delivering


def has_pictures(document, groups) -> bool:
    tiles = tiles_of(document)
    return all(
        (tile := tiles.get((stream, "", g))) is not None and tile["picture"] is not None
        for stream in ("video", "audio") for g in groups
    )  # fmt: skip


async def poll_until(base: str, predicate, timeout: float, what: str):
    """Poll /monitor.json (as the page does, which holds the viewer lease) until ``predicate(doc)``."""
    found = {}

    async def check() -> bool:
        document = await monitor_json(base)
        if predicate(document):
            found["doc"] = document
            return True
        return False

    await wait_for(check, timeout, what, interval=0.2)
    return found["doc"]


async def test_up_page_shows_every_tile_and_marks_a_frozen_picture_and_a_killed_encoder(tmp_path):
    clip = make_clip(tmp_path / "freezes.mp4", still_from=STILL_FROM, seconds=CLIP_SECONDS)
    metrics_port = free_port()
    base = f"http://127.0.0.1:{metrics_port}"
    async with loopback_ingest(tmp_path / "archive") as ingest:
        profile = build_profile(streams=STREAMS, groups={
            "primary": group(endpoint(ingest.port, name="region-a", region="eu-west"), encoder=ffmpeg()),
            "backup": group(endpoint(ingest.port, name="region-a", region="eu-west"),
                            encoder=ffmpeg(source={"kind": "file", "path": str(clip)})),
        }, metrics={"listen": f"127.0.0.1:{metrics_port}"})  # fmt: skip
        async with up_in_process(profile, stop_within=20) as running:
            await poll_until(base, lambda d: has_pictures(d, ("primary", "backup")), 60, "pictures of both groups")
            page = read_page(await dump_dom(f"{base}/monitor"))
            await screenshot(f"{base}/monitor", tmp_path / "up-monitor.png")

            assert set(page.rows) == {("video", ""), ("audio", "")}
            for stream in ("video", "audio"):
                for g in ("primary", "backup"):
                    tile = page.tile(stream, g)
                    assert tile.where == "here"
                    assert "encoder up" in tile.text
                    assert "region-a (eu-west) streaming" in tile.text
                    assert tile.index.isdigit(), f"{stream}/{g} shows a decoded fragment"
            primary = page.tile("video", "primary")
            assert primary.marks == [], f"the test pattern is moving, loud and up: {primary.text}"
            assert primary.img is not None
            assert primary.img.startswith("/monitor/thumb?")
            async with httpx.AsyncClient() as client:
                thumb = await client.get(f"{base}{primary.img}")
            assert thumb.status_code == 200
            assert thumb.content.startswith(b"\x89PNG")
            assert "pattern" in primary.text, "the lock state is shown"

            # The backup's clip turns into a still picture STILL_FROM s into each loop. Every
            # picture the page is shown is recorded: the first still fragment is shown unmarked,
            # the second is marked frozen (since the first): within two fragment durations. The
            # polling may begin inside a freeze (then the moving fragment before it was never
            # shown to us): wait for a freeze whose preceding fragment was seen, the next loop's.
            seen: dict[int, int | None] = {}  # picture index -> frozen_since

            def frozen(document) -> bool:
                picture = tiles_of(document)[("video", "", "backup")]["picture"]
                seen[picture["index"]] = picture["frozen_since"]
                since = picture["frozen_since"]
                return since is not None and since - 1 in seen  # a freeze seen starting

            await poll_until(base, frozen, 3 * CLIP_SECONDS, "the backup's picture marked frozen")
            index = max(seen)
            since = seen[index]
            assert since is not None
            assert index == since + 1, "marked at the second fragment of the freeze"
            assert seen.get(since, "missed") is None, "the freeze's first fragment was shown, not yet marked"
            assert seen.get(since - 1, "missed") is None, "the fragment before the freeze was moving"
            page = read_page(await dump_dom(f"{base}/monitor"))
            assert "frozen" in page.tile("video", "backup").marks
            assert "frozen" not in page.tile("video", "primary").marks
            await screenshot(f"{base}/monitor", tmp_path / "up-monitor-frozen.png")

            # Kill the backup's ffmpeg: its tiles are marked within two fragment durations.
            backup = next(e for e in running.group_encoders if e.group == "backup")
            assert backup.instance_pid is not None
            os.kill(backup.instance_pid, signal.SIGKILL)
            killed_at = trio.current_time()
            await poll_until(
                base, lambda d: all({"restarted", "stale", "down"} & set(tiles_of(d)[(s, "", "backup")]["marks"])
                                    for s in ("video", "audio")),
                2 * F, "the killed backup's tiles marked within two fragment durations")  # fmt: skip
            assert trio.current_time() - killed_at <= 2 * F
            page = read_page(await dump_dom(f"{base}/monitor"))
            for stream in ("video", "audio"):
                marked = page.tile(stream, "backup")
                assert "restarted" in marked.marks, marked
                assert "killed" in marked.text
                assert "restarts 1" in marked.text
                assert not {"restarted", "stale", "down"} & set(page.tile(stream, "primary").marks)
            await screenshot(f"{base}/monitor", tmp_path / "up-monitor-killed.png")


async def test_one_group_with_other_content_shows_as_different_on_the_up_and_the_ingest_pages(
    tmp_path, ingest_server, up_process
):
    clip = make_clip(tmp_path / "other.mp4", still_from=None, seconds=8)
    server = ingest_server("ingest")
    metrics_port = free_port()
    profile = write_profile(tmp_path / "event.toml", streams=STREAMS, groups={
        "primary": group(endpoint(server.port, name="region-a", region="eu-west"), encoder=ffmpeg()),
        "backup": group(endpoint(server.port, name="region-a", region="eu-west"),
                        encoder=ffmpeg(source={"kind": "file", "path": str(clip)})),
    }, metrics={"listen": f"127.0.0.1:{metrics_port}"})  # fmt: skip
    up = up_process(profile)
    up_base, ingest_base = f"http://127.0.0.1:{metrics_port}", f"http://127.0.0.1:{server.port}"

    await poll_until(up_base, lambda d: d["streams"] and d["streams"][0]["differs"], 60, "the up page's difference")
    page = read_page(await dump_dom(f"{up_base}/monitor"))
    await screenshot(f"{up_base}/monitor", tmp_path / "up-differs.png")
    assert page.rows[("video", "")]["differs"] == "yes"
    assert page.rows[("audio", "")]["differs"] == "no", "audio is compared by level only, never marked different"

    row = ("live/rig/video", "video_360p")

    def same_index_pictures(document) -> bool:
        tiles = {t["group"]: t for r in document["rows"] if (r["stream"], r["track"]) == row for t in r["tiles"]}
        pictures = [tiles.get(g, {}).get("picture") for g in ("primary", "backup")]
        return all(pictures) and pictures[0]["index"] == pictures[1]["index"]

    await poll_until(ingest_base, same_index_pictures, 60, "both groups' pictures of one index at the ingest")
    await poll_until(ingest_base, lambda d: any(r["differs"] for r in d["rows"]), 30, "the ingest's difference")
    page = read_page(await dump_dom(f"{ingest_base}/monitor"))
    await screenshot(f"{ingest_base}/monitor", tmp_path / "ingest-differs.png")
    assert page.rows[row]["differs"] == "yes"
    assert "1 row(s) differ" in page.summary
    assert page.rows[("live/rig/audio", "audio_eng")]["differs"] == "no"
    for track_row in (row, ("live/rig/audio", "audio_eng")):
        for g in ("primary", "backup"):
            tile = page.tile(track_row[0], g, track=track_row[1])
            assert tile.index.isdigit()
            assert "arrived" in tile.text
            assert "stale" not in tile.marks
    assert page.tile(*row[:1], "primary", track=row[1]).index == page.tile(*row[:1], "backup", track=row[1]).index, \
        "side by side: the same fragment index from each group"  # fmt: skip
    assert up.stop() == 0


async def test_a_peer_groups_tiles_come_through_its_monitor_and_are_marked_when_it_stops(
    tmp_path, ingest_server, up_process
):
    server = ingest_server("ingest")
    ports = {"primary": free_port(), "backup": free_port()}
    groups = {g: group(endpoint(server.port, name="region-a", region="eu-west"), encoder=ffmpeg()) for g in ports}
    processes = {}
    for name, port in ports.items():
        other = ports["backup" if name == "primary" else "primary"]
        profile = write_profile(tmp_path / f"{name}.toml", streams=STREAMS, groups=groups,
                                metrics={"listen": f"127.0.0.1:{port}"},
                                extra=f'[monitor]\npeers = ["http://127.0.0.1:{other}"]')  # fmt: skip
        processes[name] = up_process(profile, "--group", name, log=f"up-{name}.log")
    base = f"http://127.0.0.1:{ports['primary']}"
    peer = f"backup@127.0.0.1:{ports['backup']}"

    def both(document) -> bool:
        tiles = tiles_of(document)
        return all((t := tiles.get((s, "", g))) is not None and t["picture"] is not None
                   for s in ("video", "audio") for g in ("primary", peer))  # fmt: skip

    await poll_until(base, both, 60, "the primary's own tiles and the backup's through its peer")
    page = read_page(await dump_dom(f"{base}/monitor"))
    await screenshot(f"{base}/monitor", tmp_path / "peers.png")
    for stream in ("video", "audio"):
        assert page.tile(stream, "primary").where == "here"
        remote = page.tile(stream, "backup")
        assert remote.where == f"127.0.0.1:{ports['backup']}"
        assert remote.marks == []
        assert remote.img is None or remote.img.startswith("/monitor/peer/0/thumb?")
    remote = page.tile("video", "backup")
    assert remote.img is not None
    async with httpx.AsyncClient() as client:
        thumb = await client.get(f"{base}{remote.img}")
    assert thumb.status_code == 200
    assert thumb.content.startswith(b"\x89PNG"), "the peer's thumbnail, proxied"
    assert page.peers == {f"127.0.0.1:{ports['backup']}": "yes"}

    # Stop the backup's process: its tiles stay, marked within two fragment durations (down as its
    # encoder stops, then unreachable once the process is gone).
    processes["backup"].process.send_signal(signal.SIGTERM)
    await poll_until(base, lambda d: all(MARKED & set(tiles_of(d)[(s, "", peer)]["marks"]) for s in ("video", "audio")),
                     2 * F, "the stopped peer's tiles marked within two fragment durations")  # fmt: skip
    await wait_for(lambda: processes["backup"].process.poll() is not None, 15, "the backup to exit")
    gone = lambda d: all("unreachable" in tiles_of(d)[(s, "", peer)]["marks"] for s in ("video", "audio"))  # noqa: E731
    await poll_until(base, gone, 5, "the gone peer's tiles marked unreachable")
    page = read_page(await dump_dom(f"{base}/monitor"))
    await screenshot(f"{base}/monitor", tmp_path / "peers-stopped.png")
    assert page.peers == {f"127.0.0.1:{ports['backup']}": "no"}
    for stream in ("video", "audio"):
        assert "unreachable" in page.tile(stream, "backup").marks
        assert page.tile(stream, "primary").marks == []
    assert processes["primary"].stop() == 0


async def test_names_from_the_wire_are_shown_as_text_never_as_markup(tmp_path):
    """The ingest takes its group names from the X-Encoder-Group header: anyone who can POST
    chooses them. The page shows them as text."""
    hostile = '<img src="x" onerror="document.title=1"><b>bold</b>'
    async with loopback_ingest(tmp_path / "archive") as ingest, httpx.AsyncClient(timeout=10) as client:
        base = f"http://127.0.0.1:{ingest.port}"
        profile = build_profile(groups=two_groups(ingest.port), streams={"video": [video()]})
        source = SyntheticStream(profile, profile.streams[0])
        body = source.header.data + b"".join(f.data for k in range(7000, 7003) for f in source.fragment(k))
        answer = await client.post(f"{base}/live/rig.isml/Streams(video)", content=body,
                                   headers={"X-Encoder-Group": hostile})  # fmt: skip
        assert answer.status_code == 200
        html = await dump_dom(f"{base}/monitor")
        page = read_page(html)
        [tile] = page.tiles
        assert tile.group == hostile
        assert tile.text.startswith(hostile), "the name, shown literally"
        assert '<img src="x"' not in html
        assert "<b>bold</b>" not in html
        assert "&lt;b&gt;bold&lt;/b&gt;" in html
