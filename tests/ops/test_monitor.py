"""The confidence monitor's core (orchestrator.ops.monitor), step by step without a network: the
viewer lease, the shelf's keep / align / decode decisions, the picture rules on exact bytes, the
documents; and the ``[monitor]`` profile table."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from rig import build_profile, two_groups

from orchestrator.errors import ProfileError
from orchestrator.ops.monitor import (
    BLACK_LUMA,
    FLOOR_DBFS,
    GRID_HEIGHT,
    GRID_WIDTH,
    Arrivals,
    Job,
    Outputs,
    Picture,
    Shelf,
    TileJudge,
    ViewerLease,
    clock_time_ms,
    decode_argv,
    differs,
    ingest_rows,
    mean_abs_diff,
    mean_luma,
    merge_peer,
    poll_seconds,
    rms_dbfs,
    shown,
    up_tiles,
)
from orchestrator.ops.state import EncoderState, GroupState, LiveState, PublisherState
from orchestrator.ops.status import status_document

CELLS = GRID_WIDTH * GRID_HEIGHT


def grid(level: int) -> bytes:
    return bytes([level]) * CELLS


def picture(index: int, level: int = 120, dbfs: float | None = None) -> Picture:
    return Picture(index, b"png", grid(level), dbfs)


# --- lease --------------------------------------------------------------------------------------


def test_lease_is_held_for_its_ttl_after_each_renewal_and_lapses_once():
    lease = ViewerLease(ttl=10)
    assert not lease.watched(0)
    assert not lease.lapsed(0)
    lease.renew(5)
    assert lease.watched(5)
    assert lease.watched(14.9)
    lease.renew(14)
    assert lease.watched(23.9)
    assert not lease.lapsed(23.9)
    assert not lease.watched(24)
    assert lease.lapsed(24)
    assert not lease.lapsed(25), "a lapse is reported once"


# --- rules on exact bytes --------------------------------------------------------------------------


def test_luma_and_difference_of_grids():
    assert mean_luma(grid(16)) == 16
    half = bytes([0]) * (CELLS // 2) + bytes([200]) * (CELLS // 2)
    assert mean_luma(half) == 100
    assert mean_abs_diff(grid(10), grid(13)) == 3
    assert mean_abs_diff(half, grid(100)) == 100
    assert mean_abs_diff(grid(1), b"\x01") == 255, "grids of different sizes never count as the same"


def test_rms_level_of_pcm():
    assert rms_dbfs(b"") is None
    assert rms_dbfs(bytes(1600)) == FLOOR_DBFS
    full = struct.pack("<4h", 32767, -32768, 32767, -32768)
    assert rms_dbfs(full) == pytest.approx(0.0, abs=0.001)
    tenth = struct.pack("<2h", 3277, -3277)  # 0.1 of full scale: -20 dBFS
    assert rms_dbfs(tenth) == pytest.approx(20 * math.log10(3277 / 32768), abs=1e-9)
    assert rms_dbfs(struct.pack("<2h", 1, -1)) == pytest.approx(-90.3, abs=0.01)


def test_frozen_is_two_fragments_with_the_same_picture_and_clears_on_motion():
    judge = TileJudge()
    judge.add(picture(10, 120))
    assert judge.marks() == []
    assert judge.frozen_since is None
    noisy = bytes([120, 121]) * (CELLS // 2)  # half a level off on average: encoder noise, the same picture
    judge.add(Picture(11, b"png", noisy, None))
    assert judge.marks() == ["frozen"]
    assert judge.frozen_since == 10
    judge.add(picture(13, 120))  # a decode skipped (load): still the same picture
    assert judge.frozen_since == 10
    frozen = judge.last
    judge.add(picture(14, 140))
    assert judge.marks() == []
    assert frozen is not None
    assert frozen.marks() == ["frozen"], "a picture keeps the marks it was judged with"
    assert [p.frozen_since for p in judge.history] == [None, 10, 10, None]
    assert judge.frozen_since is None
    judge.add(picture(12, 140))
    assert judge.last is not None
    assert judge.last.index == 14, "an older decode never replaces a newer one"


def test_black_and_silent():
    judge = TileJudge()
    judge.add(Picture(1, b"png", grid(int(BLACK_LUMA) - 8), None))
    assert judge.marks() == ["black"]
    audio = TileJudge()
    audio.add(Picture(1, None, None, -75.0))
    assert audio.marks() == ["silent"]
    audio.add(Picture(2, None, None, -22.6))
    assert audio.marks() == [], "audio alone is never frozen: there is no picture to compare"


def test_differs_compares_pictures_of_the_same_index_only():
    assert not differs([picture(5, 100), picture(5, 104)])
    assert differs([picture(5, 100), picture(5, 160)])
    assert not differs([picture(5, 100), picture(6, 160)]), "different indices are not compared"
    assert not differs([Picture(5, None, None, -20.0), Picture(5, None, None, -80.0)])


# --- the shelf ------------------------------------------------------------------------------------


P, B = ((("video",), "primary"), (("video",), "backup"))


def shelf_with_headers(kinds: tuple[str, ...] = ("video",), **options: Any) -> Shelf:
    shelf = Shelf(**options)
    for key in (P, B):
        shelf.header(key, b"HDR", kinds)
    return shelf


def test_nothing_is_kept_for_an_unknown_stream_or_kind():
    shelf = Shelf()
    shelf.offer(P, 1, "video", b"x" * 10)
    assert shelf.size == 0
    assert shelf.jobs(8) == []
    shelf.header(P, b"HDR", ["video"])
    shelf.offer(P, 1, "audio", b"y" * 10)
    assert shelf.size == 0


def test_an_index_is_decoded_once_when_all_its_kinds_arrived():
    shelf = Shelf()
    shelf.header(P, b"HDR", ["video", "audio"])
    shelf.offer(P, 7, "video", b"v7")
    assert shelf.jobs(8) == [], "audio of 7 missing"
    shelf.offer(P, 7, "audio", b"a7")
    [job] = shelf.jobs(8)
    assert (job.key, job.index, job.video_data, job.audio_data) == (P, 7, b"HDRv7", b"HDRa7")
    assert shelf.jobs(8) == [], "busy: one decode per tile at a time"
    shelf.done(job)
    assert shelf.jobs(8) == [], "never the same index twice"
    assert shelf.size == 0, "what is decoded is let go"
    shelf.offer(P, 6, "video", b"v6")
    shelf.offer(P, 6, "audio", b"a6")
    assert (shelf.size, shelf.jobs(8)) == (0, []), "never an older index"


def test_each_tile_decodes_its_newest_complete_index():
    shelf = shelf_with_headers()
    for k in (10, 11, 12):
        shelf.offer(P, k, "video", b"p")
    shelf.offer(B, 10, "video", b"b")
    shelf.offer(B, 11, "video", b"b")
    jobs = shelf.jobs(8)
    assert {job.key: job.index for job in jobs} == {P: 12, B: 11}, "the newest wins: older ones are skipped"
    for job in jobs:
        shelf.done(job)
    assert shelf.size == 0


def judged(*indices_levels: tuple[int, int]) -> tuple[Picture, TileJudge]:
    judge = TileJudge()
    for index, level in indices_levels:
        judge.add(picture(index, level))
    assert judge.last is not None
    return judge.last, judge


def test_tiles_side_by_side_show_the_newest_index_they_all_hold():
    late = (("video",), "late")
    pictures = {P: judged((10, 100), (11, 100), (12, 100)), B: judged((9, 100), (10, 200), (11, 200)),
                late: judged((3, 50))}  # fmt: skip
    showing = shown(pictures)
    assert (showing[P].index, showing[B].index) == (11, 11), "the primary shows 11 too, not its newer 12"
    assert showing[late].index == 3, "a tile far behind (stopped) does not hold the others back"
    assert differs(p for p in showing.values()), "11 from each, at 100 and 200: different content"
    only = {P: judged((10, 100), (11, 100), (12, 100)), B: judged((5, 100), (6, 100), (7, 100))}
    assert {k: p.index for k, p in shown(only).items()} == {P: 12, B: 7}
    history = judged(*((i, 100) for i in range(10)))[1].history
    assert [p.index for p in history] == [6, 7, 8, 9], "the last HISTORY pictures"


def test_the_shelf_keeps_the_last_indices_within_its_byte_budget():
    shelf = shelf_with_headers(budget=100, keep=2)
    for k in range(5):
        shelf.offer(P, k, "video", b"x" * 20)
    assert shelf.size == 40, "2 indices of 20 bytes"
    for k in range(5):
        shelf.offer(B, k, "video", b"y" * 40)
    assert (shelf.size, shelf.refused) == (80, 0), "over the budget, the backup gave up its own older index"
    jobs = shelf.jobs(8)
    assert {job.key: job.index for job in jobs} == {P: 4, B: 4}
    shelf.offer(P, 9, "video", b"w" * 101)
    assert (shelf.refused, shelf.size) == (1, 40), "a fragment over the whole budget is refused, counted"
    for job in jobs:
        shelf.done(job)
    shelf.clear()
    assert shelf.size == 0
    shelf.offer(P, 10, "video", b"z")
    assert [j.video_data for j in shelf.jobs(8)] == [b"HDRz"], "clear() keeps the headers"


def test_decode_argv_is_one_process_per_kind_for_a_batch_with_outputs_per_job():
    def out(i: int) -> Outputs:
        return Outputs(f"v{i}.mp4", f"a{i}.mp4", f"t{i}.png", f"g{i}.gray", f"a{i}.pcm")

    batch = [(Job(P, 1, b"h", video=b"v", audio=b"a"), out(0)), (Job(B, 1, b"h", audio=b"a"), out(1))]
    video = decode_argv("ffmpeg", batch, "video")
    assert video is not None
    assert video[0] == "ffmpeg"
    assert [video[i + 1] for i, a in enumerate(video) if a == "-i"] == ["v0.mp4"], "job 1 has no video"
    assert video[video.index("-filter_complex") + 1].startswith("[0:v:0]scale=")
    assert video[-1] == "g0.gray"
    assert "t0.png" in video
    assert video.count("-frames:v") == 2
    assert "a0.pcm" not in video
    audio = decode_argv("ffmpeg", batch, "audio")
    assert audio is not None
    assert [audio[i + 1] for i, a in enumerate(audio) if a == "-i"] == ["a0.mp4", "a1.mp4"]
    assert audio[audio.index("1:a:0") - 1] == "-map"
    assert audio[-1] == "a1.pcm"
    assert "-filter_complex" not in audio
    assert decode_argv("ffmpeg", batch[1:], "video") is None


def test_with_fewer_decodes_than_tiles_every_tile_gets_its_turn():
    keys = [((f"s{i}",), "g") for i in range(5)]
    shelf = Shelf()
    for key in keys:
        shelf.header(key, b"H", ["video"])
    served = []
    for k in range(5):
        for key in keys:
            shelf.offer(key, k, "video", b"x")
        for job in shelf.jobs(2):
            served.append(job.key)
            shelf.done(job)
    assert [served.count(key) for key in keys] == [2, 2, 2, 2, 2], "2 decodes per fragment, shared in turn"


# --- documents --------------------------------------------------------------------------------------


def test_shared_clock_time_and_poll_interval():
    epoch_ns = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
    assert clock_time_ms(epoch_ns, (2 * 10**9, 1), 3) == 1_767_225_606_000
    assert clock_time_ms(epoch_ns, (1001 * 10**9, 500), 1) == 1_767_225_602_002
    assert poll_seconds(2.0) == 1.0
    assert poll_seconds(6.0) == 3.0
    assert poll_seconds(1.0) == 1.0


def live_state(*, backup_up: bool = True) -> LiveState:
    live = LiveState(presentation="rig", fragment_duration=2.0)
    for group, up in (("primary", True), ("backup", backup_up)):
        state = GroupState(group)
        state.set_up(up, 1000.0)
        live.groups.append(state)
        live.encoders.append(EncoderState(group, "video", last_index=99, lock="pattern", content_offset=0.0))
        p = PublisherState(group, "video", "region-a", "eu-west")
        p.set_connected(True, 1000.0)
        live.publishers.append(p)
    return live


def test_up_tiles_carry_the_status_facts_the_picture_and_the_marks():
    live = live_state(backup_up=False)
    live.groups[0].record_failure("killed: exit -9", -9, now_wall=1005.0)
    status = status_document(live, now_wall=1010.0, now_monotonic=50.0)
    judge = TileJudge()
    judge.add(picture(99, 130))
    assert judge.last is not None
    [stream] = up_tiles(status, {P: (judge.last, judge)}, ages={P: 0.5, B: 3.5}, epoch_ns=0,
                        fragment_ns=(2 * 10**9, 1), thumb_url=lambda key, i: f"/t/{key[1]}/{i}")  # fmt: skip
    primary, backup = stream["tiles"]
    facts = (primary["group"], primary["where"], primary["encoder_up"], primary["last_index"])
    assert facts == ("primary", "here", True, 99)
    assert primary["clock_time_ms"] == 198_000
    assert primary["picture"] == {"index": 99, "url": "/t/primary/99", "luma": 130.0, "level_dbfs": None,
                                  "frozen_since": None}  # fmt: skip
    assert primary["marks"] == ["restarted"], "failed 5 s ago, within 5 fragment durations"
    assert primary["last_error"] == "killed: exit -9"
    assert primary["endpoints"] == [{"endpoint": "region-a", "region": "eu-west", "state": "streaming"}]
    assert backup["marks"] == ["stale", "down"]
    assert backup["picture"] is None
    later = status_document(live, now_wall=1020.1, now_monotonic=60.1)
    [stream] = up_tiles(later, {}, ages={P: 0.5, B: 0.5}, epoch_ns=0, fragment_ns=(2 * 10**9, 1),
                        thumb_url=lambda key, i: "")  # fmt: skip
    assert stream["tiles"][0]["marks"] == [], "10.1 s after the failure: no longer marked"


def test_peer_tiles_are_merged_by_stream_with_proxy_urls_and_marked_when_unreachable():
    streams: list[dict[str, Any]] = [{"stream": "video", "tiles": [{"group": "primary", "where": "here"}],
                                      "differs": False}]  # fmt: skip
    peer = {"streams": [
        {"stream": "video", "differs": True, "tiles": [
            {"group": "backup", "where": "here", "marks": [], "picture": {"index": 4, "url": "/monitor/thumb?s=video"}},
            {"group": "third", "where": "10.0.0.9:9464", "marks": []}]},
        {"stream": "extra", "tiles": [{"group": "backup", "where": "here", "picture": {"url": "http://evil/x.png"}}]},
        {"stream": 5}, "junk"]}  # fmt: skip
    merge_peer(streams, peer, "peer-b:9464", lambda url: None if url is None or "evil" in url else "/proxied",
               unreachable=True)  # fmt: skip
    video, extra = streams
    assert [t["group"] for t in video["tiles"]] == ["primary", "backup"], "the peer's own peers are not repeated"
    backup = video["tiles"][1]
    assert backup["where"] == "peer-b:9464"
    assert backup["marks"] == ["unreachable"]
    assert backup["picture"]["url"] is None, "an unreachable peer's thumbnail is not offered"
    assert video["differs"] is True
    assert extra["tiles"][0]["picture"]["url"] is None
    reached: list[dict[str, Any]] = []
    merge_peer(reached, peer, "peer-b:9464", lambda url: None if url is None or "evil" in url else "/proxied")
    assert reached[0]["tiles"][0]["picture"]["url"] == "/proxied"
    assert reached[0]["tiles"][0]["marks"] == []
    assert reached[1]["tiles"][0]["picture"]["url"] is None, "only the peer's own thumbnail route is proxied"


def test_ingest_rows_per_stream_and_track_with_arrivals_per_group():
    now = 100.0
    arrivals = {(("live/x/video", "v360"), "primary"): Arrivals("video"),
                (("live/x/video", "v360"), "backup"): Arrivals("video")}  # fmt: skip
    arrivals[(("live/x/video", "v360"), "primary")].add(8, 16_000, 2.0, "archived", now - 0.5)
    arrivals[(("live/x/video", "v360"), "backup")].add(8, 16_000, 2.0, "duplicate", now - 3.5)
    arrivals[(("live/x/video", "v360"), "backup")].add(7, 14_000, 2.0, "duplicate", now - 3.5)
    pictures = {}
    for key, level in ((("live/x/video", "v360"), "primary"), 100), ((("live/x/video", "v360"), "backup"), 200):
        judge = TileJudge()
        judge.add(picture(8, level))
        pictures[key] = (judge.last, judge)
    [row] = ingest_rows(arrivals, pictures, now=now, thumb_url=lambda key, i: f"{key[1]}:{i}")  # type: ignore[arg-type]
    assert (row["stream"], row["track"], row["kind"], row["differs"]) == ("live/x/video", "v360", "video", True)
    backup, primary = row["tiles"]
    assert backup["group"] == "backup"
    assert backup["last_index"] == 8
    assert backup["media_ms"] == 16_000
    assert backup["outcomes"] == {"duplicate": 2}
    assert backup["marks"] == ["stale"]
    assert primary["marks"] == []
    assert primary["picture"]["url"] == "primary:8"


# --- the profile table -----------------------------------------------------------------------------


def test_monitor_table_defaults_and_peers():
    profile = build_profile(groups=two_groups(9000))
    assert profile.monitor.enabled
    assert profile.monitor.peers == []
    assert profile.monitor.concurrency == 2
    profile = build_profile(groups=two_groups(9000), extra='[monitor]\npeers = ["http://10.0.1.2:9464", "https://b:1"]')
    assert profile.monitor.peers == ["http://10.0.1.2:9464", "https://b:1"]


@pytest.mark.parametrize(("peers", "reason"), [
    ('["10.0.1.2:9464"]', "a peer is http://host:port"),
    ('["ftp://h:1"]', "a peer is http://host:port"),
    ('["http://user:secret@h:1"]', "no credentials in a peer URL"),
    ('["http://h:1/metrics"]', "base URL only"),
    ('["http://h:1?x=1"]', "base URL only"),
    ('["http://h:1", "http://h:1"]', "each peer once"),
])  # fmt: skip
def test_bad_monitor_peers_name_the_key_and_the_reason(peers, reason):
    with pytest.raises(ProfileError) as caught:
        build_profile(groups=two_groups(9000), extra=f"[monitor]\npeers = {peers}")
    assert "monitor.peers" in str(caught.value)
    assert reason in str(caught.value)
    assert "secret" not in str(caught.value) or "credentials" in reason
