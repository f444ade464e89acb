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

from prometheus_client import CollectorRegistry
from rig import TEST_SETTINGS, build_profile, endpoint, group, loopback_ingest, up_in_process, wait_for

from orchestrator.ingest.server import IngestApp
from orchestrator.profile import Profile
from orchestrator.push.publisher import PublisherSettings
from orchestrator.supervisor import Running
from orchestrator.testing.faultproxy import FaultProxy


def faults_profile(proxy_port: int, backup_port: int, backlog_seconds: int, state_dir: Path) -> Profile:
    """Two streams (29.97 fps video; 48 kHz stereo AAC), 2 s fragments; the primary pushes through
    the proxy with a bounded backlog, the backup to ``backup_port``."""
    return build_profile(name="faults", state_dir=state_dir, groups={
        "primary": group(endpoint(proxy_port, name="region-a", region="eu-west"),
                         max_backlog={"seconds": backlog_seconds, "bytes": "64MiB"}),
        "backup": group(endpoint(backup_port, name="region-a", region="eu-west")),
    })  # fmt: skip


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
        await wait_for(predicate, timeout, what)

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
    async with loopback_ingest(tmp_path / "archive", proxy=True, receive_buffer=proxy_receive_buffer) as loopback:
        assert loopback.proxy is not None
        assert loopback.proxy_port is not None
        backup_port = loopback.proxy_port if backup_through_proxy else loopback.port
        profile = faults_profile(loopback.proxy_port, backup_port, backlog_seconds, tmp_path / "state")
        registry = CollectorRegistry()
        async with up_in_process(profile, registry, groups=list(groups), shutdown_grace=8.0,
                                 publisher_settings=settings) as running:  # fmt: skip
            rig = Rig(loopback.app, loopback.proxy, running, profile, registry)
            try:
                yield rig
            finally:
                rig.proxy.heal()  # then up_in_process stops ``up`` gracefully, and the servers go


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
