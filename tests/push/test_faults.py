"""Fault injection on real loopback sockets: every fault is survived with nothing missing.

Each scenario runs ``up`` (primary through the fault proxy, backup direct), lets both groups
stream, injects one fault into the primary's path for a few seconds, heals it, waits until the
primary has caught up with the backup, stops gracefully, and then checks at the receiver:

* the merged timeline (what the publishing point archived from both groups) has no gap, no
  conflict, no header mismatch;
* the primary's own timeline, over all its POSTs, has no gap and sits on the shared clock (every
  outage here is far shorter than the 120 s backlog bound);
* after every broken POST, the next one opened with the header (the receiver refuses a POST
  without it) and resent at least the last two fragments of each track.

Scenarios are short (about 15 s each): two-second fragments are the smallest the spec allows.
"""

from __future__ import annotations

import pytest
import trio
from faultkit import (
    assert_group_timeline_whole,
    assert_merged_timeline_whole,
    assert_resend_on_every_reconnect,
    fault_rig,
    now,
)

from orchestrator.testing.faultproxy import Fault

pytestmark = pytest.mark.integration

PRIMARY = {"stream": "video", "group": "primary", "endpoint": "region-a", "endpoint_region": "eu-west"}


async def run_fault(tmp_path, inject, *, outage: float, heal=None):
    async with fault_rig(tmp_path) as rig:
        await rig.wait_fragments("primary", 2)
        await inject(rig)
        await trio.sleep(outage)
        healed_at = now()
        if heal is not None:
            heal(rig)
        rig.proxy.heal()
        await rig.wait_caught_up()
    assert_merged_timeline_whole(rig)
    assert_group_timeline_whole(rig, "primary")
    assert_group_timeline_whole(rig, "backup")
    assert assert_resend_on_every_reconnect(rig, "primary") >= 1
    assert rig.metric("orchestrator_reconnects_total", **PRIMARY) >= 1
    assert rig.metric("orchestrator_resent_fragments_total", **PRIMARY) >= 2
    assert rig.metric("orchestrator_dropped_fragments_total", **PRIMARY) == 0
    return rig, healed_at


@pytest.mark.parametrize(("fault", "options", "outage"), [
    (Fault.RESET, {}, 0.5),
    (Fault.BLACKHOLE, {}, 7.0),
    (Fault.DRIP, {"drip_bytes_per_second": 4000}, 8.0),  # ~1/10 of the stream's rate
    (Fault.CLOSE_AFTER, {"close_after_bytes": 150_000}, 8.0),  # about two video fragments
], ids=["connection_reset_mid_body", "black_hole", "slow_drip", "connections_closed_after_a_few_bytes"])  # fmt: skip
async def test_a_fault_for_a_while(tmp_path, fault, options, outage):
    async def inject(rig):
        rig.proxy.set_fault(fault, **options)

    await run_fault(tmp_path, inject, outage=outage)


async def test_endpoint_refusing_connections_for_a_while(tmp_path):
    async def inject(rig):
        rig.proxy.set_fault(Fault.DOWN)  # the open POST dies and nothing gets through for 6 s (3 fragments)

    rig, healed_at = await run_fault(tmp_path, inject, outage=6.0)
    # Back within 1 s plus the current backoff step (capped at 1 s here) of the heal.
    reopened = [p["started"] for p in rig.posts("primary") if p["started"] >= healed_at]
    assert reopened
    assert reopened[0] - healed_at <= 1.0 + 1.0 + 0.5


@pytest.mark.parametrize("status", [503, 401])
async def test_endpoint_answering_an_error_status(tmp_path, status):
    async def inject(rig):
        rig.app.fail_with = status  # every new request gets this answer...
        rig.proxy.set_fault(Fault.RESET)  # ...and the primary's open POST is cut so it must reconnect
        await trio.sleep(0.05)
        rig.proxy.heal()

    def fix(rig):
        rig.app.fail_with = None

    rig, _ = await run_fault(tmp_path, inject, outage=5.0, heal=fix)
    reason = "server" if status == 503 else "unauthorized"
    assert rig.metric("orchestrator_post_failures_total", **PRIMARY, reason=reason) >= 2


async def test_outage_longer_than_the_backlog_bound_drops_oldest_and_counts_them(tmp_path):
    async with fault_rig(tmp_path, backlog_seconds=4) as rig:
        await rig.wait_fragments("primary", 2)
        rig.proxy.set_fault(Fault.DOWN)
        await trio.sleep(9.0)  # ~4 fragments produced, only ~2 fit in the bound
        rig.proxy.heal()
        await rig.wait_caught_up()
    # The primary lost some fragments for good (counted), but the backup covered them.
    assert rig.metric("orchestrator_dropped_fragments_total", **PRIMARY) >= 1
    assert_merged_timeline_whole(rig)


async def test_a_reset_of_an_idle_post_is_noticed_at_once_not_at_the_next_fragment(tmp_path):
    async with fault_rig(tmp_path) as rig:
        await rig.wait_fragments("primary", 2)

        def pushed() -> int:
            return sum(len(p["fragments"]) for p in rig.posts("primary"))

        count = pushed()
        await rig.wait_until(lambda: pushed() > count, 5, "the next fragment")
        await trio.sleep(0.2)  # a fragment just went out: both POSTs are idle for ~1.8 s
        posts_before = {p["id"] for p in rig.posts("primary")}
        reset_at = now()
        rig.proxy.set_fault(Fault.RESET)
        await rig.wait_until(lambda: len([p for p in rig.posts("primary") if p["id"] not in posts_before]) >= 2,
                             5, "new POSTs for both streams")  # fmt: skip
        reopened = min(p["started"] for p in rig.posts("primary") if p["id"] not in posts_before)
    assert reopened - reset_at < 1.0


async def test_both_groups_behind_a_stalled_receiver_then_reset_lose_nothing(tmp_path):
    """A receiver (or a request-buffering proxy) that stops reading for 20 s while keeping the
    connections open, then resets them all. With the kernel's default buffers the writes of the
    low-bitrate audio stream (~16 kB/s) keep fitting in socket buffers for the whole stall, so no
    send timeout fires and hundreds of kilobytes sit unconfirmed when the reset comes. Both groups
    are behind it, so the backup cannot cover what the primary's resend misses: every track's
    merged timeline must still be whole."""
    async with fault_rig(tmp_path, backup_through_proxy=True, proxy_receive_buffer=None) as rig:
        await rig.wait_fragments("primary", 2)
        await rig.wait_fragments("backup", 2)
        rig.proxy.set_fault(Fault.STALL)
        await trio.sleep(20.0)
        rig.proxy.set_fault(Fault.RESET)
        pairs = [(g, s) for g in ("primary", "backup") for s in ("video", "audio")]
        target = max(rig.last_index(g, s) for g, s in pairs) + 2
        await rig.wait_until(lambda: all(rig.last_index(g, s) >= target for g, s in pairs), 30,
                             f"both groups to reach index {target}")  # fmt: skip
    assert_merged_timeline_whole(rig)
    for group in ("primary", "backup"):
        assert_group_timeline_whole(rig, group)
        assert assert_resend_on_every_reconnect(rig, group) >= 2  # both streams reconnected
    status = rig.status()["publishing_points"]["live/faults"]["streams"]
    assert set(status) == {"video", "audio"}
    for stream in status.values():
        for track in stream["tracks"].values():
            assert track["fragments_archived"] >= 12, track  # 2 before, 10 during the stall, then more
            assert track["fragments_archived"] == track["last_index"] - track["first_index"] + 1, track
