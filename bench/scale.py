"""Scale benchmark: N streams in one ``orchestrator up``, every fragment on time, cost per stream.

Not a test: it prints figures. For each N (default 10, 100, 300, 1000) it writes a profile of N
single-track video streams (synthetic encoder, 2 s fragments) in two groups, primary and backup,
each pushing every stream to two endpoints: 4N long-running POSTs. The sink is the counting
sink (``orchestrator.testing.countsink``) in its own process: it reads the chunked bodies and
records when the last byte of each fragment arrived. ``orchestrator up`` runs as a separate
process too, as in production, with its metrics endpoint on.

Once every POST is open (and two fragment durations more), over a window of ``--window`` seconds it reports:

  posts_open     POSTs open at the sink at the end of the window (of 4N)
  all open after seconds from starting ``up`` until all 4N POSTs were open at the sink
  steady after   seconds from starting ``up`` until the fragments queued meanwhile were out and
                 99.9 % of those arriving in a 4 s probe were on time; the window starts then
  on_time_%      of the fragments whose end on the shared clock falls in the window, for every
                 one of the 4N (stream, group, endpoint), the share whose last byte reached the
                 sink within 1 s of that end (missing fragments count as late); and the delay
                 (last byte at the sink minus the fragment's end) at the median, 99th percentile, max
  cpu_%          CPU time of the ``up`` process over the window, in % of one core
  cpu_%/stream   the same per stream
  rss_MB         resident memory of ``up`` at the end of the window; rss_kB/stream

Then, in the same run:

* throughput: one POST pushing ``--big-count`` fragments of ``--big-mb`` MB each (a 30 Mbit/s
  2 s fragment is about 8 MB) through the project's ``Publisher`` (its connector as ``up`` builds
  it), against a plain ``httpx`` chunked POST of the same bytes to the same sink, best of three
  each, alternating, and the ratio;
* ingest: ``up`` with ``--ingest-n`` streams pushing into one ``orchestrator ingest`` (the
  project's publishing point, which checks, de-duplicates and archives every fragment), with
  the ingest server's CPU and RSS over the window and its count of active POSTs.

The machine's load (``uptime``) is printed first and last: other work on the machine shows up
in every figure.

Run:  .venv/bin/python bench/scale.py [--sizes 10,100,300,1000] [--window 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import httpx
import trio

from orchestrator.clock import NS_PER_SECOND, TrackClock
from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.fmp4 import boxes
from orchestrator.fmp4.stream import EncodedFragment, StreamHeader
from orchestrator.ops.metrics import Metrics
from orchestrator.profile import Endpoint, load_profile
from orchestrator.push.connection import Connector
from orchestrator.push.handoff import EndpointOutbox, HeaderBoard
from orchestrator.push.outbox import OutboxLimits
from orchestrator.push.publisher import Publisher, PublisherSettings
from orchestrator.testing import profiles
from orchestrator.wire import smooth

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test rig's free_port
from rig import free_port

FRAGMENT_SECONDS = 2
ON_TIME_NS = NS_PER_SECOND
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_profile(path: Path, n: int, endpoints: list[str]) -> None:
    """``n`` streams of one small video track each, both groups synthetic, every group pushing to
    every one of ``endpoints``."""
    streams = {f"s{i:04d}": [profiles.video(f"v{i:04d}", bitrate=250_000, width=192, height=108, frame_rate="25")]
               for i in range(n)}  # fmt: skip
    points = [profiles.endpoint(name=f"e{j}", region=f"r{j}", url=url) for j, url in enumerate(endpoints)]
    profiles.write_profile(path, name="scale", fragment_duration=FRAGMENT_SECONDS, streams=streams,
                           presentation={"video_timescale": 90000, "tfxd_version": 1},
                           metrics={"listen": "127.0.0.1:0"},
                           groups={g: profiles.group(*points) for g in ("primary", "backup")})  # fmt: skip


def raise_nofile() -> None:
    """For the sink and the ingest server (run as preexec_fn): one descriptor per POST."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def archive_bytes(root: Path) -> int:
    """Bytes in the files under ``root`` (the ingest server's archive)."""
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def start_sink() -> tuple[subprocess.Popen[str], int]:
    sink = subprocess.Popen([sys.executable, "-m", "orchestrator.testing.countsink"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile)  # fmt: skip
    assert sink.stdout is not None
    port = json.loads(sink.stdout.readline())["port"]
    return sink, port


def sink_report(port: int, clear: bool = False) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/report{'?clear=1' if clear else ''}", timeout=60).json()


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_up(profile: Path, duration: float, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as stderr:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--log-level", "warning", "up", str(profile), "--status", "off",
             "--duration", str(duration)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, text=True)  # fmt: skip


MAX_START = 180.0  # seconds for every POST to open and the start-up backlog to drain, at most


def run_n(n: int, window: float, tmp: Path) -> dict[str, float]:
    sink, port = start_sink()
    try:
        base = f"http://127.0.0.1:{port}"
        profile_path = tmp / f"scale-{n}.toml"
        write_profile(profile_path, n, [f"{base}/e0/scale.isml", f"{base}/e1/scale.isml"])
        profile = load_profile(profile_path)
        clock: TrackClock = profile.track_clock(profile.streams[0].tracks[0])  # every stream has the same clock
        log = tmp / f"up-{n}.log"
        up = start_up(profile_path, MAX_START + window + 10, log)
        try:
            started = time.monotonic()
            while sink_report(port, clear=True)["open_posts"] < 4 * n:  # every POST open (the report is small)
                if up.poll() is not None:
                    raise SystemExit(f"up exited early ({up.returncode}); see {log}:\n{log.read_text()[-2000:]}")
                if time.monotonic() - started > MAX_START:
                    break  # report what is open
                time.sleep(0.5)
            start_s = time.monotonic() - started
            # The fragments queued while the POSTs opened go out first: wait until what arrives
            # is on time again (steady state), within the same bound.
            while time.monotonic() - started < MAX_START:
                sink_report(port, clear=True)
                time.sleep(2 * FRAGMENT_SECONDS)
                recent = sink_report(port)["fragments"]
                if recent and sum(a - clock.end_ns(k) <= ON_TIME_NS for _, _, k, _, a in recent) >= 0.999 * len(recent):
                    break
            steady_s = time.monotonic() - started
            sink_report(port, clear=True)
            t0_ns, cpu0 = time.time_ns(), cpu_seconds(up.pid)
            time.sleep(window)
            t1_ns, cpu1, rss = time.time_ns(), cpu_seconds(up.pid), rss_bytes(up.pid)
            time.sleep(ON_TIME_NS / NS_PER_SECOND + 0.5)
            report = sink_report(port)
        finally:
            stop(up)
    finally:
        stop(sink)
    due = [k for k in range(clock.index_at(t0_ns), clock.index_at(t1_ns) + 1) if t0_ns < clock.end_ns(k) <= t1_ns]
    expected = {(f"/e{e}/scale.isml/Streams(s{i:04d})", g, k) for i in range(n) for e in (0, 1)
                for g in ("primary", "backup") for k in due}  # fmt: skip
    on_time, lateness = set(), {}
    for target, group, k, _tfdt, arrival_ns in report["fragments"]:
        key = (target, group, k)
        if key in expected:
            lateness.setdefault(key, arrival_ns - clock.end_ns(k))  # the first copy of it
            if arrival_ns - clock.end_ns(k) <= ON_TIME_NS:
                on_time.add(key)
    late = sorted(lateness.values())

    def pct(q: float) -> float:
        return late[min(len(late) - 1, int(q * len(late)))] / 1e6 if late else float("nan")

    cpu = 100 * (cpu1 - cpu0) / ((t1_ns - t0_ns) / NS_PER_SECOND)
    return {
        "n": n, "posts": 4 * n, "posts_open": report["open_posts"], "fragments_due": len(expected),
        "on_time_pct": 100 * len(on_time) / max(1, len(expected)), "cpu_pct": cpu, "cpu_pct_per_stream": cpu / n,
        "rss_mb": rss / 1e6, "rss_kb_per_stream": rss / 1e3 / n, "start_s": start_s, "steady_s": steady_s,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0),
    }  # fmt: skip


# --- throughput: one POST, large fragments --------------------------------------------------------------------


def big_fragments(count: int, megabytes: float) -> list[EncodedFragment]:
    size = int(megabytes * 1_000_000)
    payload = os.urandom(size)
    out = []
    for k in range(count):
        run = boxes.TrackRun(1, k * 180_000, [boxes.Sample(payload, 180_000)], k)
        out.append(EncodedFragment("big", 1, k, k * 180_000, 180_000, 90_000, smooth.write_fragment(k, [run])))
    return out


async def push_with_publisher(port: int, header: StreamHeader, fragments: list[EncodedFragment]) -> float:
    settings = PublisherSettings(send_timeout=60.0, idle_timeout=60.0)
    limits = OutboxLimits(max_seconds=Fraction(3600), max_bytes=1 << 40)
    outbox = EndpointOutbox(limits)
    board = HeaderBoard("primary", "big")
    board.announce(header)
    endpoint = Endpoint(name="sink", region="local", url=f"http://127.0.0.1:{port}/big/big.isml")
    publisher = Publisher(group="primary", stream_id="big", endpoint=endpoint, header=board, outbox=outbox,
                          metrics=Metrics(), settings=settings, connector=Connector(settings.send_timeout))  # fmt: skip
    for fragment in fragments:
        outbox.push(fragment)
    outbox.close()
    start = time.perf_counter()
    await publisher.run()  # probe, one POST with every fragment, end of body, final response
    elapsed = time.perf_counter() - start
    if publisher.state.failures:
        raise SystemExit(f"the publisher's POST failed: {publisher.state.last_error}")
    return elapsed


async def push_with_raw_httpx(port: int, header: StreamHeader, fragments: list[EncodedFragment]) -> float:
    async def body():
        yield header.data
        for fragment in fragments:
            yield fragment.data

    async with httpx.AsyncClient(timeout=60) as client:
        start = time.perf_counter()
        await client.post(f"http://127.0.0.1:{port}/big/big.isml/Streams(big)", content=b"")  # the same probe
        response = await client.post(f"http://127.0.0.1:{port}/big/big.isml/Streams(big)", content=body())
        elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


def throughput(count: int, megabytes: float) -> dict[str, float]:
    from orchestrator.encode.synthetic import SyntheticStream

    demo = load_profile(Path(__file__).resolve().parent.parent / "profiles" / "demo.toml")
    header = SyntheticStream(demo, demo.streams[0]).header
    fragments = big_fragments(count, megabytes)
    total = len(header.data) + sum(len(f.data) for f in fragments)
    sink, port = start_sink()
    try:
        ours, raw = [], []
        for _ in range(3):
            ours.append(trio.run(push_with_publisher, port, header, fragments))
            raw.append(trio.run(push_with_raw_httpx, port, header, fragments))
        seen = sink_report(port)["fragments_total"]
        if seen != 6 * count:
            raise SystemExit(f"the sink counted {seen} fragments, expected {6 * count}")
    finally:
        stop(sink)
    mbps_ours, mbps_raw = total * 8 / min(ours) / 1e6, total * 8 / min(raw) / 1e6
    return {"bytes": total, "publisher_mbit_s": mbps_ours, "raw_httpx_mbit_s": mbps_raw, "ratio": mbps_ours / mbps_raw}


# --- the project's ingest server at scale ---------------------------------------------------------------------


STATUS_TIMEOUT = 120.0  # seconds for the ingest server's /status to answer, at most


def run_ingest(n: int, window: float, tmp: Path) -> dict[str, float]:
    """``up`` with ``n`` streams (4n POSTs) into one ``orchestrator ingest``; its CPU, RSS and
    archive rate over ``window`` seconds once every POST is open, and its POSTs active at both
    ends of the window, read while ``up`` still runs.

    If not every POST is open within ``MAX_START`` seconds it measures what is, and says so.
    Raises SystemExit if ``up`` exits, or ``/status`` does not answer 200 within ``STATUS_TIMEOUT``, before
    the window ends: then no figure would mean what it says. (The first version of this function
    measured a server capped at 512 connections, which refused 3,488 of the 4,000 POSTs over and
    over; waited the whole ``MAX_START`` for a count it could not reach; and read its last
    ``/status`` after ``up`` had reached its ``--duration`` and ended every POST: "POSTs active 0".)
    """
    posts = 4 * n
    port = free_port()
    archive = tmp / "archive"
    # One connection per POST, plus this function's /status reads and POSTs reopening while the
    # connection of the one they replace is still closing.
    max_connections = posts + max(32, posts // 20)
    with (tmp / "ingest.log").open("w") as ingest_log:  # the child keeps its own descriptor
        ingest = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--log-level", "warning", "ingest", "--listen",
             f"127.0.0.1:{port}", "--archive", str(archive), "--max-connections", str(max_connections)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=ingest_log, preexec_fn=raise_nofile,
            text=True)  # fmt: skip
    status_url = f"http://127.0.0.1:{port}/status"

    def status(timeout: float = STATUS_TIMEOUT) -> dict:
        try:
            response = httpx.get(status_url, timeout=timeout)
        except httpx.TimeoutException:
            raise SystemExit(f"GET {status_url} had no answer within {timeout:g} s: the server is overloaded") from None
        if response.status_code != 200:
            raise SystemExit(f"GET {status_url} answered {response.status_code}: {response.text.strip()!r}")
        return response.json()

    def status_or_none() -> dict | None:
        try:
            return status()
        except SystemExit as exc:
            print(f"# ingest run: {exc}", flush=True)
            return None

    try:
        for _ in range(100):
            try:
                httpx.get(status_url, timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        profile_path = tmp / f"ingest-{n}.toml"
        base = f"http://127.0.0.1:{port}"
        write_profile(profile_path, n, [f"{base}/e0/scale.isml", f"{base}/e1/scale.isml"])
        profile = load_profile(profile_path)
        clock: TrackClock = profile.track_clock(profile.streams[0].tracks[0])  # every stream has the same clock
        up_log = tmp / "up-ingest.log"
        # up stops by itself (--duration) only as a last resort: it is stopped below, after the last reading.
        up = start_up(profile_path, MAX_START + window + 120, up_log)

        def check_up(when: str) -> None:
            if up.poll() is not None:
                raise SystemExit(f"up exited ({up.returncode}) {when}; see {up_log}:\n{up_log.read_text()[-2000:]}")

        try:
            started, open_s, most = time.monotonic(), float("nan"), 0
            while time.monotonic() - started < MAX_START:  # until every POST is open; else measure what is
                with contextlib.suppress(SystemExit):  # a server too busy to answer now may answer later
                    most = max(most, status(timeout=10)["posts"]["active"])
                if most >= posts:
                    open_s = time.monotonic() - started
                    break
                check_up("before every POST was open")
                time.sleep(1.0)
            time.sleep(2 * FRAGMENT_SECONDS)
            # CPU over [t0, t1]; the archive counters over the two readings, timed when the answer
            # came (the server takes its snapshot when it gets to the request, the wait is before).
            # A server that cannot keep up may not answer /status in time: then the archive's size on
            # disk says how much it wrote (CPU and RSS come from /proc either way).
            t0, cpu0, bytes0 = time.monotonic(), cpu_seconds(ingest.pid), archive_bytes(archive)
            status0, read0 = status_or_none(), time.monotonic()
            time.sleep(max(0.0, window - (read0 - t0)))
            t1, cpu1, rss, bytes1 = (
                time.monotonic(),
                cpu_seconds(ingest.pid),
                rss_bytes(ingest.pid),
                archive_bytes(archive),
            )
            status1, read1, read_ns = status_or_none(), time.monotonic(), time.time_ns()
            check_up("before the end of the window: its POSTs ended and the figures count them")
        finally:
            stop(up)
    finally:
        stop(ingest)

    def tracks(status: dict) -> list[dict]:
        return [t for p in status["publishing_points"].values() for s in p["streams"].values()
                for t in s["tracks"].values()]  # fmt: skip

    def archived(status: dict) -> int:
        return sum(t["fragments_archived"] for t in tracks(status))

    # How far each track's archive is behind the shared clock when the window ended: the time from
    # the end of its newest archived fragment to the last reading. 2 s (a fragment duration) plus
    # the push delay for a server that keeps up.
    seconds = t1 - t0
    fragment_bytes = sum(len(f.data) for f in SyntheticStream(profile, profile.streams[0]).fragment(0))
    result: dict = {
        "n": n, "open_s": open_s, "posts_active_most": most, "cpu_pct": 100 * (cpu1 - cpu0) / seconds,
        "rss_mb": rss / 1e6, "expected_per_s": 2 * n / FRAGMENT_SECONDS,  # two publishing points, one copy each
        "written_per_s": (bytes1 - bytes0) / seconds / fragment_bytes,  # from the archive's size on disk
        "posts_active": None, "archived_per_s": None,
    }  # fmt: skip
    if status0 is None or status1 is None:
        print(f"# ingest run: {posts} POSTs, at most {most} seen open; /status did not answer in the window, "
              f"so the archive rate is from its size on disk: {result['written_per_s']:.0f} fragments/s",
              flush=True)  # fmt: skip
        return result
    # How far each track's archive is behind the shared clock when the window ended: the time from
    # the end of its newest archived fragment to the last reading. 2 s (a fragment duration) plus
    # the push delay for a server that keeps up.
    lag = sorted((read_ns - clock.end_ns(clock.index_of_tick(t["last_timestamp"]))) / NS_PER_SECOND
                 for t in tracks(status1) if t["last_timestamp"] is not None)  # fmt: skip
    result.update({
        "posts_active": status1["posts"]["active"], "posts_active_start": status0["posts"]["active"],
        "posts_opened_in_window": status1["posts"]["total"] - status0["posts"]["total"],
        "max_connections": status1["connections"]["max_connections"],
        "refusals": sum(status1["refusals"].values()) + status1["connections"]["refused"],
        "archived_per_s": (archived(status1) - archived(status0)) / (read1 - read0),
        "status_s": read1 - t1,
        "tracks": len(lag), "lag_p50_s": lag[len(lag) // 2] if lag else float("nan"),
        "lag_max_s": lag[-1] if lag else float("nan"),
    })  # fmt: skip
    opened = f"all open after {open_s:.0f} s" if most >= posts else f"at most {most} open in {MAX_START:g} s"
    print(f"# ingest run: {posts} POSTs {opened} (cap {result['max_connections']}); "
          f"in the window: POSTs active {result['posts_active_start']} -> {result['posts_active']}, "
          f"{result['posts_opened_in_window']} opened, {result['refusals']} refused in all; "
          f"archive lag behind the clock over {len(lag)} of {2 * n} tracks: median {result['lag_p50_s']:.1f} s, "
          f"max {result['lag_max_s']:.1f} s; /status answered in {result['status_s']:.1f} s", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Scale benchmark (see the module docstring).")
    parser.add_argument("--sizes", default="10,100,300,1000")
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--big-mb", type=float, default=8.0)
    parser.add_argument("--big-count", type=int, default=8)
    parser.add_argument("--ingest-n", type=int, default=1000, help="0 to skip")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# bench/scale.py  {started}  cores={os.cpu_count()}")
    print(f"# load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print("| N streams | POSTs | POSTs open | all open after | steady after | fragments due | on time (≤ 1 s) "
              "| delay p50 / p99 / max | CPU of `up` (one core) | CPU per stream | RSS | RSS per stream |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in (int(s) for s in args.sizes.split(",")):
            r = run_n(n, args.window, tmp)
            print(f"| {n} | {r['posts']} | {r['posts_open']} | {r['start_s']:.0f} s | {r['steady_s']:.0f} s "
                  f"| {r['fragments_due']} "
                  f"| {r['on_time_pct']:.2f} % | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} / {r['max_ms']:.0f} ms "
                  f"| {r['cpu_pct']:.1f} % | {r['cpu_pct_per_stream']:.3f} % | {r['rss_mb']:.0f} MB "
                  f"| {r['rss_kb_per_stream']:.0f} kB |", flush=True)  # fmt: skip
        if not args.skip_throughput:
            t = throughput(args.big_count, args.big_mb)
            print(f"\nthroughput, one POST, {args.big_count} x {args.big_mb:g} MB fragments "
                  f"({t['bytes'] / 1e6:.0f} MB), "
                  f"best of 3: publisher {t['publisher_mbit_s']:.0f} Mbit/s, raw httpx {t['raw_httpx_mbit_s']:.0f} "
                  f"Mbit/s, ratio {t['ratio']:.2f}", flush=True)  # fmt: skip
        if args.ingest_n:
            g = run_ingest(args.ingest_n, args.window, tmp)
            active = "?" if g["posts_active"] is None else g["posts_active"]
            rate = g["written_per_s"] if g["archived_per_s"] is None else g["archived_per_s"]
            print(f"\ningest server, {g['n']} streams ({4 * g['n']} POSTs) from `up`: "
                  f"POSTs active {active}, "
                  f"CPU {g['cpu_pct']:.1f} % of one core, RSS {g['rss_mb']:.0f} MB, fragments archived "
                  f"{rate:.0f}/s of {g['expected_per_s']:.0f}/s expected", flush=True)  # fmt: skip
    print(f"\n# load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
