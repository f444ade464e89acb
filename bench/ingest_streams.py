"""Streams per ``orchestrator ingest`` process, with a pusher too light to be the bottleneck.

Not a test: it prints figures. ``bench/scale.py``'s ingest run pushes with ``orchestrator up``,
which at 1,000 streams on a small machine cannot open its 4,000 POSTs (its connects time out
while the ingest server idles at ~20 % of a core): it measures ``up``, not the ingest. Here the
pusher is this process: raw chunked POSTs over loopback, one trio task each, sending fragments
rendered once and shared by every POST (the synthetic encoder's, 2 s each), on schedule.

For each N it runs one ``orchestrator ingest`` (its own process, ``--max-connections`` above
4N) and opens 4N POSTs, as ``scale.py`` does: N streams x two groups (primary, backup) x two
publishing points, so half the fragments are archived and half are duplicates dropped. Each POST
sends its header, then one fragment every 2 s, the POSTs' phases spread evenly over the 2 s.
Once every POST is open (and one fragment period more), over ``--window`` seconds it reports:

  archived/s     fragments the server archived per second (expected: N per s), from the growth
                 of the archive on disk (every fragment is the same size)
  send lag       how late the pusher's sends completed against their schedule, p50 / p99 / max:
                 a server that keeps up reads every fragment as it comes, so the lag stays near 0;
                 one that does not holds the pusher back through TCP
  ingest CPU     CPU time of the ingest process over the window, in % of one core; RSS at its end
  pusher CPU     the same for this process (it must stay well under one core for the figures to
                 be about the server)

The machine's load (``uptime``) is printed first and last.

Run:  .venv/bin/python bench/ingest_streams.py [--sizes 300,1000] [--window 20]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import trio
import trio.lowlevel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import archive_bytes, cpu_seconds, free_port, raise_nofile, rss_bytes, stop, write_profile

from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.profile import load_profile

K0 = 14_080_000  # a fragment index near the shared clock's present
PERIOD = 2.0  # seconds per fragment


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def push(port: int, path: str, group: str, header: bytes, fragments: list[bytes], start: float,
               lags: list[float], opened: list[int]) -> None:  # fmt: skip
    """One POST: the header at once, then fragment k at ``start + k * PERIOD``, until cancelled."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nhost: bench\r\ntransfer-encoding: chunked\r\nx-encoder-group: {group}\r\n"
            f"\r\n").encode()  # fmt: skip
    try:
        await stream.send_all(head + chunk(header))
        opened[0] += 1
        for k, fragment in enumerate(fragments):
            due = start + k * PERIOD
            await trio.sleep_until(due)
            await stream.send_all(chunk(fragment))
            lags.append(trio.current_time() - due)
    except (trio.BrokenResourceError, trio.ClosedResourceError):  # the server ended this POST: its log says why
        opened[1] += 1
        return
    await trio.sleep_forever()


def status(port: int) -> dict | None:
    """The server's /status, or None if it does not answer within 30 s (it is overloaded)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/status", timeout=30).json()  # type: ignore[no-any-return]
    except httpx.TimeoutException:
        return None


def run(n: int, window: float, tmp: Path) -> dict[str, float]:
    posts = 4 * n
    port = free_port()
    with (tmp / f"ingest-{n}.log").open("w") as log:
        ingest = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--log-level", "warning", "ingest", "--listen",
             f"127.0.0.1:{port}", "--archive", str(tmp / f"archive-{n}"), "--max-connections", str(posts + 200)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=raise_nofile)  # fmt: skip
    try:
        for _ in range(100):
            try:
                status(port)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        write_profile(tmp / "p.toml", 1, ["http://127.0.0.1:1/e0/scale.isml"])
        profile = load_profile(tmp / "p.toml")
        synthetic = SyntheticStream(profile, profile.streams[0])
        header = synthetic.header.data
        count = int((60 + window) / PERIOD) + 4
        fragments = [synthetic.fragment(K0 + k)[0].data for k in range(count)]
        return trio.run(measure, n, port, ingest.pid, header, fragments, window, tmp / f"archive-{n}")
    finally:
        stop(ingest)
        log_text = (tmp / f"ingest-{n}.log").read_text()
        reasons = Counter(line.split("reason=", 1)[1][:60] for line in log_text.splitlines() if "reason=" in line)
        print(f"# ingest log: {len(log_text.splitlines())} lines; reasons: {reasons.most_common(3)}", flush=True)


async def measure(n: int, port: int, pid: int, header: bytes, fragments: list[bytes], window: float,
                  archive: Path) -> dict:  # fmt: skip
    posts = 4 * n
    lags: list[float] = []
    opened = [0, 0]  # POSTs opened, POSTs the server ended
    async with trio.open_nursery() as nursery:
        begin = trio.current_time() + 5.0  # the first fragments once the POSTs had time to open
        k = 0
        for i in range(n):
            for group in ("primary", "backup"):
                for point in ("e0", "e1"):
                    start = begin + PERIOD * k / posts
                    path = f"/{point}/scale.isml/Streams(s{i:04d})"
                    nursery.start_soon(push, port, path, group, header, fragments, start, lags, opened)
                    k += 1
                    if k % 100 == 0:
                        await trio.lowlevel.checkpoint()  # let the connects proceed
        with trio.move_on_after(60):
            while opened[0] < posts:  # noqa: ASYNC110  (a bench: polling is the simple thing)
                await trio.sleep(0.1)
        open_s = trio.current_time() - begin + 5.0
        await trio.sleep_until(max(trio.current_time(), begin) + PERIOD)
        # The archive's growth on disk counts what was archived (every fragment is the same size):
        # a server that cannot keep up may not answer /status in time.
        t0, cpu0, self0 = time.monotonic(), cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
        bytes0 = archive_bytes(archive)
        lags.clear()
        await trio.sleep(window)
        t1, cpu1, self1 = time.monotonic(), cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
        rss, bytes1 = rss_bytes(pid), archive_bytes(archive)
        window_lags = sorted(lags)
        state1 = await trio.to_thread.run_sync(status, port)
        nursery.cancel_scope.cancel()
    seconds = t1 - t0
    pusher = (self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime) / seconds

    def pick(q: float) -> float:
        return window_lags[min(len(window_lags) - 1, int(q * len(window_lags)))] if window_lags else float("nan")

    return {
        "n": n, "posts": posts, "opened": opened[0], "open_s": open_s, "ended": opened[1],
        "active": state1["posts"]["active"] if state1 else "?",
        "archived_per_s": (bytes1 - bytes0) / seconds / len(fragments[0]), "expected_per_s": 2 * n / PERIOD,
        "lag_p50": pick(0.5), "lag_p99": pick(0.99), "lag_max": window_lags[-1] if window_lags else float("nan"),
        "sends": len(window_lags), "sends_due": posts * window / PERIOD,
        "ingest_cpu_pct": 100 * (cpu1 - cpu0) / seconds, "ingest_rss_mb": rss / 1e6, "pusher_cpu_pct": 100 * pusher,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="Streams per ingest process (see the module docstring).")
    parser.add_argument("--sizes", default="300,1000")
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args()
    print(f"# bench/ingest_streams.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("| N streams | POSTs | open | archived/s (expected) | sends in window (due) | send lag p50 / p99 / max "
          "| ingest CPU (one core) | ingest RSS | pusher CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            r = run(n, args.window, Path(tmp))
            print(f"| {n} | {r['posts']} | {r['opened']} in {r['open_s']:.0f} s, {r['active']} active, "
                  f"{r['ended']} ended by the server "
                  f"| {r['archived_per_s']:.0f} ({r['expected_per_s']:.0f}) | {r['sends']} ({r['sends_due']:.0f}) "
                  f"| {1000 * r['lag_p50']:.0f} / {1000 * r['lag_p99']:.0f} / {1000 * r['lag_max']:.0f} ms "
                  f"| {r['ingest_cpu_pct']:.0f} % | {r['ingest_rss_mb']:.0f} MB | {r['pusher_cpu_pct']:.0f} % |",
                  flush=True)  # fmt: skip
    print(f"# load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
