"""The orchestrator itself killed (SIGKILL, as an OOM kill or a lost node does it) and started
again: the restarted process continues the primary's timeline from its state directory, never
sending an index it already sent, never a timestamp lower than one already sent, and the
backup (another process, as in production where each group runs in its own pod) covers the
seconds the primary was down, so the merged timeline at the receiver has no gap.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import pytest
from rig import audio, get_status, two_groups, video, wait_until, write_profile

from orchestrator.profile import load_profile

pytestmark = pytest.mark.integration


def fragments_by_process(port: int, group: str, boundary_post: int) -> tuple[dict, dict]:
    """(track -> [(index, time)]) for the group's POSTs before and from ``boundary_post`` on."""
    before: dict[int, list[tuple[int, int]]] = defaultdict(list)
    after: dict[int, list[tuple[int, int]]] = defaultdict(list)
    status = get_status(port, posts=True)
    assert status is not None
    for post in status["post_log"]:
        if post["encoder_group"] != group:
            continue
        side = after if post["id"] >= boundary_post else before
        for f in post["fragments"]:
            side[f["track"]].append((f["index"], f["time"]))
    return before, after


def test_killed_orchestrator_restarts_and_continues_the_timeline(tmp_path: Path, ingest_server, up_process):
    ingest = ingest_server("ingest", archive=tmp_path / "archive")
    port = ingest.port
    profile_path = write_profile(tmp_path / "restart.toml", name="restart", groups=two_groups(port),
                                 streams={"av": [video("video", frame_rate=25), audio("audio", sample_rate=44100)]},
                                 state_dir=tmp_path / "state")  # fmt: skip
    profile = load_profile(profile_path)
    logs = [ingest.log] + [tmp_path / name for name in ("backup.log", "primary-1.log", "primary-2.log")]
    backup = up_process(profile_path, "--group", "backup", log=logs[1], ready=None)
    primary = up_process(profile_path, "--group", "primary", log=logs[2], ready=None)

    def primary_fragments() -> int:
        status = get_status(port, posts=True) or {"post_log": []}
        return sum(len(p["fragments"]) for p in status["post_log"] if p["encoder_group"] == "primary")

    wait_until(lambda: primary_fragments() >= 6, 30, "3 fragments from the first primary process", logs)
    primary.process.send_signal(signal.SIGKILL)
    assert primary.process.wait(10) == -signal.SIGKILL
    status = get_status(port, posts=True)
    boundary = status["posts"]["total"] + 1  # every later POST comes from the new process
    killed_at = primary_fragments()
    assert (tmp_path / "state" / "restart.primary.json").exists()

    primary = up_process(profile_path, "--group", "primary", log=logs[3], ready=None)
    wait_until(lambda: primary_fragments() >= killed_at + 6, 30, "3 fragments from the restarted primary", logs)
    assert primary.stop() == 0
    assert backup.stop() == 0

    before, after = fragments_by_process(port, "primary", boundary)
    clocks = [profile.track_clock(t) for t in profile.streams[0].tracks]
    for track, clock in enumerate(clocks, start=1):
        assert before[track], f"track {track}: nothing from the first process"
        assert after[track], f"track {track}: nothing from the restarted process"
        for index, time in before[track] + after[track]:
            assert time == clock.start(index), f"track {track}: index {index} is off the shared clock"
        last_sent = max(index for index, _ in before[track])
        first_again = min(index for index, _ in after[track])
        assert first_again > last_sent, f"track {track}: index {first_again} sent again after the restart"
        assert min(t for _, t in after[track]) > max(t for _, t in before[track])
        indices = [index for index, _ in after[track]]
        assert indices == sorted(indices)

    merged = get_status(port)["publishing_points"]["live/restart"]["streams"]["av"]
    assert merged["header_mismatches"] == 0
    for track in merged["tracks"].values():
        assert track["gaps"] == 0, track
        assert track["conflicts"] == 0, track
    assert "supervisor.state.restored group=primary" in logs[3].read_text()
