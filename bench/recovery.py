"""Recovery benchmark: for each network fault, how long from "the endpoint is reachable again" to
"the first fragment from the faulted group is accepted", and how many fragments were lost.

Not a test: it prints figures. Real sockets on loopback, ``up`` in-process with the synthetic
encoder (2-second fragments, two streams), the primary group behind the project's fault proxy,
the backup group direct. For each fault: stream for a while, inject the fault for ``--outage``
seconds, heal it, and watch the receiver every 10 ms until the primary's first fragment after
the heal arrives, then until the primary has caught up with the backup.

Reported per fault:
  recovery_s     heal -> first primary fragment processed by the receiver
  backoff_s      the publisher's retry delay in force at the heal (the "current backoff step")
  catch_up_s     heal -> the primary has sent everything the backup has sent
  lost_primary   fragment indices missing from the primary's own timeline (per track, summed)
  lost_merged    gaps in the merged (de-duplicated) timeline at the receiver

Run:  .venv/bin/python bench/recovery.py [--outage 6] [--production-retry]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the fault rig lives with the tests

from faultkit import TEST_SETTINGS, fault_rig

from orchestrator.push.publisher import PublisherSettings
from orchestrator.testing.faultproxy import Fault

FAULTS = ["reset", "refuse", "blackhole", "drip", "close_after", "http_503", "http_401"]


async def inject(rig, fault: str) -> None:
    if fault == "reset":
        rig.proxy.set_fault(Fault.RESET)
    elif fault == "refuse":
        rig.proxy.set_fault(Fault.DOWN)
    elif fault == "blackhole":
        rig.proxy.set_fault(Fault.BLACKHOLE)
    elif fault == "drip":
        rig.proxy.set_fault(Fault.DRIP, drip_bytes_per_second=4000)
    elif fault == "close_after":
        rig.proxy.set_fault(Fault.CLOSE_AFTER, close_after_bytes=150_000)
    else:
        rig.app.fail_with = int(fault.removeprefix("http_"))
        rig.proxy.set_fault(Fault.RESET)
        await trio.sleep(0.05)
        rig.proxy.heal()


async def measure(fault: str, outage: float, settings: PublisherSettings) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory() as tmp:
        async with fault_rig(Path(tmp), settings=settings) as rig:
            await rig.wait_fragments("primary", 2)
            publisher = next(p for p in rig.running.publishers if p.group == "primary" and p.stream_id == "video")
            if fault == "reset":
                # The endpoint is reachable again the instant after the reset.
                posts_before = dict.fromkeys((p["id"] for p in rig.posts("primary")), 1 << 62)
                reachable = time.monotonic()
                await inject(rig, fault)
                backoff = 0.0
            else:
                await inject(rig, fault)
                await trio.sleep(outage)
                backoff = publisher.retry_delay
                # Fragments of POSTs open at the heal do not count (a black-holed POST's show up
                # when the heal resets it): wait for a fragment on a POST opened after it.
                # Except after close_after: the heal lifts the byte budget of the open POSTs, which
                # carry on, so any new fragment counts.
                posts_before = {p["id"]: len(p["fragments"]) for p in rig.posts("primary")}
                if fault != "close_after":
                    posts_before = dict.fromkeys(posts_before, 1 << 62)
                reachable = time.monotonic()
                rig.app.fail_with = None
                rig.proxy.heal()
            with trio.fail_after(60):
                # Polling on purpose: the receiver signals nothing; 10 ms is the measurement's resolution.
                while not any(len(p["fragments"]) > posts_before.get(p["id"], 0) for p in rig.posts("primary")):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            recovery = time.monotonic() - reachable
            await rig.wait_caught_up(timeout=60)
            catch_up = time.monotonic() - reachable
        seen = rig.seen("primary")
        lost_primary = sum(max(i) - min(i) + 1 - len(i) for i in seen.values())
        lost_merged = sum(
            track["gaps"]
            for point in rig.status()["publishing_points"].values()
            for stream in point["streams"].values()
            for track in stream["tracks"].values()
        )
    return {"recovery_s": recovery, "backoff_s": backoff, "catch_up_s": catch_up,
            "lost_primary": lost_primary, "lost_merged": lost_merged}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage", type=float, default=6.0, help="seconds each fault lasts (default 6)")
    parser.add_argument("--production-retry", action="store_true",
                        help="production retry policy (cap 8 s, 15 s for 401), not the tests' (1 s)")  # fmt: skip
    parser.add_argument("--faults", default=",".join(FAULTS))
    args = parser.parse_args()
    settings = PublisherSettings.for_fragment_duration(2.0) if args.production_retry else TEST_SETTINGS
    print(f"# outage {args.outage:g} s per fault, 2 s fragments, retry cap {settings.retry.cap:g} s "
          f"(slow {settings.retry.slow:g} s), send timeout {settings.send_timeout:g} s")  # fmt: skip
    print(f"{'fault':<12} {'recovery_s':>10} {'backoff_s':>9} {'catch_up_s':>10} {'lost_primary':>12} "
          f"{'lost_merged':>11}")  # fmt: skip
    for fault in args.faults.split(","):
        r = await measure(fault, args.outage, settings)
        print(f"{fault:<12} {r['recovery_s']:>10.2f} {r['backoff_s']:>9.2f} {r['catch_up_s']:>10.2f} "
              f"{r['lost_primary']:>12} {r['lost_merged']:>11}", flush=True)  # fmt: skip


if __name__ == "__main__":
    trio.run(main)
