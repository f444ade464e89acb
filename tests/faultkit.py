"""A fault-injection rig for tests and benchmarks, all on loopback, all real sockets.

One ingest server (the local publishing point) archives what arrives. The primary group pushes
to it through a :class:`~orchestrator.testing.faultproxy.FaultProxy`; the backup group pushes to it
directly, so it stays healthy while faults hit the primary. ``orchestrator up`` runs in-process
(``run_up``), with the synthetic encoder, two streams (29.97 fps video; 48 kHz stereo AAC) and
2-second fragments.

The checks read the ingest server's ``/status`` data (its receiver): which fragments arrived in
which POST from which group, the merged timeline's gaps, conflicts and header mismatches.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.profile import Profile, parse_profile
from orchestrator.push.publisher import PublisherSettings
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.supervisor import Running, UpOptions, run_up
from orchestrator.testing.faultproxy import FaultProxy

PROFILE = """
[presentation]
name = "faults"
fragment_duration = 2
epoch = 2026-01-01T00:00:00Z

[[streams]]
id = "video"
  [[streams.tracks]]
  kind = "video"
  name = "video_360p"
  bitrate = 800_000
  width = 640
  height = 360
  frame_rate = "30000/1001"

[[streams]]
id = "audio"
  [[streams.tracks]]
  kind = "audio"
  name = "audio_eng"
  bitrate = 128_000
  sample_rate = 48000
  channels = 2

[groups.primary]
encoder = {{ backend = "synthetic" }}
max_backlog = {{ seconds = {backlog_seconds}, bytes = "64MiB" }}
  [[groups.primary.endpoints]]
  name = "region-a"
  region = "eu-west"
  url = "http://127.0.0.1:{proxy_port}/live/faults.isml"

[groups.backup]
encoder = {{ backend = "synthetic" }}
  [[groups.backup.endpoints]]
  name = "region-a"
  region = "eu-west"
  url = "http://127.0.0.1:{backup_port}/live/faults.isml"

[metrics]
enabled = false

[state]
dir = "{state_dir}"
"""

# Fast enough for short tests, same shape as production (spec 7.1, 7.2): a 3 s send timeout for
# 2 s fragments, retries capped at 1 s.
TEST_SETTINGS = PublisherSettings(
    connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
    retry=RetryPolicy(base=0.2, cap=1.0, slow=1.0, jitter=0.1),
)  # fmt: skip


@dataclass
class Rig:
    app: IngestApp
    proxy: FaultProxy
    running: Running
    profile: Profile
    registry: CollectorRegistry

    def status(self) -> dict[str, Any]:
        return self.app.point.status(posts=True)

    def posts(self, group: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.status()["post_log"] if group is None or p["encoder_group"] == group]

    def seen(self, group: str) -> dict[tuple[str, int], set[int]]:
        """(stream, track) -> every fragment index the receiver got from ``group``."""
        out: dict[tuple[str, int], set[int]] = defaultdict(set)
        for post in self.posts(group):
            for f in post["fragments"]:
                if f["outcome"] != "rejected":
                    out[(post["stream"], f["track"])].add(f["index"])
        return out

    def last_index(self, group: str, stream: str = "video") -> int:
        return max(self.seen(group).get((stream, self.first_track(stream)), {-1}))

    def first_track(self, stream: str) -> int:
        return self.profile.track_ids(self.profile.stream(stream))[0]

    async def wait_until(self, predicate, timeout: float, what: str) -> None:
        with trio.move_on_after(timeout) as scope:
            while not predicate():
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    async def wait_fragments(self, group: str, count: int, timeout: float = 20.0) -> None:
        def enough() -> bool:
            seen = self.seen(group)
            return all(len(seen.get((s, self.first_track(s)), ())) >= count for s in ("video", "audio"))

        await self.wait_until(enough, timeout, f"{count} fragments per stream from {group}")

    async def wait_caught_up(self, timeout: float = 20.0) -> None:
        """Until the primary has sent everything the backup has, plus one more fragment."""
        target = self.last_index("backup") + 1
        await self.wait_until(lambda: min(self.last_index("primary", s) for s in ("video", "audio")) >= target,
                              timeout, f"the primary to reach index {target}")  # fmt: skip

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def fault_rig(tmp_path: Path, *, backlog_seconds: int = 120, groups=("primary", "backup"),
                    settings: PublisherSettings = TEST_SETTINGS, backup_through_proxy: bool = False,
                    proxy_receive_buffer: int | None = 4096):  # fmt: skip
    """Start the ingest server, the proxy and ``up``; stop ``up`` gracefully on exit.

    ``backup_through_proxy``: both groups' endpoints sit behind the proxy (a fault hits both).
    ``proxy_receive_buffer``: the proxy's SO_RCVBUF (small by default, so a black hole stalls a
    sender quickly); None keeps the kernel's default buffers, as a real receiver has them."""
    async with trio.open_nursery() as nursery:
        app = IngestApp(tmp_path / "archive")
        _, ingest_port = await nursery.start(serve_app, app, "127.0.0.1", 0)
        proxy = FaultProxy(("127.0.0.1", ingest_port), receive_buffer=proxy_receive_buffer)
        _, proxy_port = await nursery.start(proxy.run)
        backup_port = proxy_port if backup_through_proxy else ingest_port
        text = PROFILE.format(proxy_port=proxy_port, backup_port=backup_port, backlog_seconds=backlog_seconds,
                              state_dir=tmp_path / "state")  # fmt: skip
        profile = parse_profile(text, "faults.toml")
        registry = CollectorRegistry()
        options = UpOptions(groups=list(groups), status="off", handle_signals=False, shutdown_grace=8.0,
                            publisher_settings=settings)  # fmt: skip
        running = await nursery.start(lambda task_status: run_up(profile, options, registry=registry,
                                                                 task_status=task_status))  # fmt: skip
        rig = Rig(app, proxy, running, profile, registry)
        try:
            yield rig
        finally:
            rig.proxy.heal()
            running.stop.set()
            # run_up returns by itself after its graceful stop; then the servers go.
            with trio.fail_after(15):
                while running.stop.is_set() and any(p.connected for p in running.publishers):
                    await trio.sleep(0.05)
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()


def assert_merged_timeline_whole(rig: Rig) -> None:
    """Spec 9: one copy of every fragment, no gap, no disagreement between the groups."""
    for point in rig.status()["publishing_points"].values():
        for stream_id, stream in point["streams"].items():
            assert stream["header_mismatches"] == 0, stream_id
            for track_id, track in stream["tracks"].items():
                where = f"{stream_id} track {track_id}"
                assert track["gaps"] == 0, f"{where}: {track}"
                assert track["conflicts"] == 0, f"{where}: {track}"
                assert track["rejected"] == 0, f"{where}: {track}"


def assert_group_timeline_whole(rig: Rig, group: str) -> None:
    """The group's own fragments, over all its POSTs, have no gap, and sit on the shared clock;
    every track of every stream was received from it (an empty record is a failure, not a pass)."""
    seen = rig.seen(group)
    expected_tracks = {(s.id, t) for s in rig.profile.streams for t in rig.profile.track_ids(s)}
    assert set(seen) == expected_tracks, f"{group}: received tracks {sorted(seen)}, expected {sorted(expected_tracks)}"
    for (stream_id, track_id), indices in seen.items():
        assert len(indices) >= 2, f"{group} {stream_id}/{track_id}: only {sorted(indices)}"
        expected = set(range(min(indices), max(indices) + 1))
        assert indices == expected, f"{group} {stream_id}/{track_id} is missing {sorted(expected - indices)}"
    checked = 0
    for post in rig.posts(group):
        for f in post["fragments"]:
            clock = rig.profile.track_clock(rig.profile.track(post["stream"], f["track"]))
            assert (f["time"], f["duration"]) == (clock.start(f["index"]), clock.duration(f["index"]))
            checked += 1
    assert checked >= sum(map(len, seen.values()))


def assert_resend_on_every_reconnect(rig: Rig, group: str) -> int:
    """Every POST that follows a broken one (same stream) opens with the header (the receiver
    refuses a POST without it, and counts a different one as a mismatch) and starts with a resend
    (spec 4.7, 7.5.d) of at least the last two fragments of each track the receiver already had
    from this group: its first index is at or before the second highest the receiver had, so the
    seam has no gap and two fragments overlap. (The publisher resends the fragment it was
    writing, the last two it wrote completely, and every fragment within its unconfirmed byte
    window, which covers what a dead connection's buffers swallowed; tests/push/test_outbox.py
    pins the exact rule.) Returns how many seams were checked."""
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for post in rig.posts(group):
        by_stream[post["stream"]].append(post)
    checked = 0
    for stream_id, posts in by_stream.items():
        delivered: dict[int, list[int]] = defaultdict(list)  # track -> indices so far, over all POSTs
        broken = False
        for post in posts:
            for track in sorted({f["track"] for f in post["fragments"]}):
                first = next(f["index"] for f in post["fragments"] if f["track"] == track)
                before = sorted(set(delivered[track]))
                if broken and len(before) >= 2:
                    where = f"{group} {stream_id} track {track}: POST {post['id']} starts at index {first}"
                    assert first <= before[-1] + 1, f"{where}, after {before[-1]}: a fragment was skipped"
                    assert first <= before[-2], (
                        f"{where}: fewer than the last two resent (the receiver had {before[-2]} and {before[-1]})"
                    )
                    checked += 1
                delivered[track].extend(f["index"] for f in post["fragments"] if f["track"] == track)
            if post["fragments"]:
                broken = post["status"] != "ok"
            elif post["status"] != "ok":
                broken = True
    return checked


def now() -> float:
    return time.time()
