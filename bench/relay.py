"""Relay benchmark: the first field report's question, measured. "If there is a network failure
between the local IIS and a remote IIS while live streaming, will the data that was streamed
during the network failure be transmitted once the network is restored?"

Not a test: it prints figures. ffmpeg's own Smooth push (``-movflags isml+frag_keyframe -f ismv``,
H.264 + AAC, real time) as the encoder of each stream, one ``orchestrator relay`` process (durable
spool, fsync per fragment), and two remote ``orchestrator ingest`` processes, each behind the
project's TCP fault proxy (orchestrator/testing/faultproxy.py, in this process). Timeline: warm
up, then remote a DOWN for ``--outage`` seconds, a pause, then both remotes DOWN for ``--outage``
seconds, then a tail; ffmpeg stops, the relay drains, the archives are read back.

Reported:
  lost            per remote: fragments the relay forwarded (its orchestrator_relay_fragments_total)
                  that the remote did not archive, and holes in each archived track read by ffprobe
                  (video: frames missing between the first and the last; audio: AAC frames)
  catch_up_s      per outage and remote: heal -> the remote has archived every fragment the relay
                  had read before the heal (its last_timestamp per track reaches the relay's)
  relay CPU       % of one core and CPU seconds per stream per minute, idle (before the encoders,
                  the baseline) and while relaying; memory: RSS and peak RSS, and per stream

With ``--scale N[,N...]`` it measures the relay's cost at N streams instead: ``orchestrator up``
(synthetic encoder, one 800 kbit/s video track per stream, 2 s fragments) stands for N
third-party encoders, each stream one long POST to the relay; the relay (durable spool, fsync per
fragment) pushes every stream to two endpoints, two counting sinks
(``orchestrator.testing.countsink``): N POSTs in, 2N out. Once every POST is open, over
``--window`` seconds: the relay's CPU (% of one core, and per stream), its RSS (and per stream,
above the idle relay's), and the fragments the sinks received against the fragments due.

Run:  .venv/bin/python bench/relay.py [--streams 2] [--outage 60] [--warmup 20] [--gap 20] [--tail 30]
      .venv/bin/python bench/relay.py --scale 100,300 [--window 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the rig's free_port lives with the tests

from rig import free_port

from orchestrator.testing.faultproxy import Fault, FaultProxy
from orchestrator.testing.ismvpush import ismv_push_argv
from orchestrator.testing.profiles import endpoint, group, write_profile

FRAME = 400_000  # 25 fps in ffmpeg's 10 MHz ticks
AAC_FRAME = 1024 * 10_000_000 / 48_000


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdout=out, stderr=subprocess.STDOUT)


def get(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def metric(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name`` on a /metrics page, by its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.TransportError:
        return {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


def archived(port: int, streams: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    status = get(f"http://127.0.0.1:{port}/status") or {}
    point = status.get("publishing_points", {}).get("live/bench", {}).get("streams", {})
    return {(s, t["name"]): t for s in streams for t in point.get(s, {}).get("tracks", {}).values()}


def relay_last(metrics_url: str) -> dict[tuple[str, str], int]:
    """(stream, track name) -> start of the last fragment the relay forwarded."""
    names = {"1": "video", "2": "audio"}
    out = {}
    for labels, value in metric(metrics_url, "orchestrator_relay_last_fragment_start_ticks").items():
        d = dict(labels)
        out[(d["stream"], names[d["track"]])] = int(value)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def holes(path: Path, step: float) -> tuple[int, int]:
    """(packets, missing packets between the first and the last) of a track file, by ffprobe."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=pts", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    pts = sorted(int(p["pts"]) for p in json.loads(out.stdout)["packets"])
    if not pts:
        return 0, 0
    expected = round((pts[-1] - pts[0]) / step) + 1
    return len(pts), expected - len(pts)


async def poll_until(predicate: Any, interval: float = 0.1) -> None:
    """Poll ``predicate()`` until it is true (the caller bounds the wait with a cancel scope)."""
    while True:
        if predicate():
            return
        await trio.sleep(interval)


async def catch_up(heal: float, before: dict[tuple[str, str], int], port: int, streams: list[str]) -> float:
    """Seconds from ``heal`` until the remote has archived, for every (stream, track), a fragment
    at or after the relay's last forwarded start at the heal."""
    while True:
        tracks = archived(port, streams)
        if all(key in tracks and (tracks[key]["last_timestamp"] or -(1 << 62)) >= start
               for key, start in before.items()):  # fmt: skip
            return time.monotonic() - heal
        await trio.sleep(0.1)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    streams = [f"s{i}" for i in range(args.streams)]
    total = args.warmup + args.outage + args.gap + args.outage + args.tail
    remotes = []
    for name in ("a", "b"):
        port = free_port()
        process = start(["ingest", "--listen", f"127.0.0.1:{port}", "--archive", str(tmp / name)], tmp / f"{name}.log")
        remotes.append((name, port, process))
    result: dict[str, Any] = {"streams": args.streams, "outage_s": args.outage, "seconds": total}
    relay = None
    encoders: list[trio.Process] = []
    try:
        for _, port, _ in remotes:
            with trio.fail_after(30):
                await poll_until(lambda port=port: get(f"http://127.0.0.1:{port}/status") is not None)
        async with trio.open_nursery() as nursery:
            proxies = [FaultProxy(("127.0.0.1", port)) for _, port, _ in remotes]
            proxy_ports = [(await nursery.start(p.run))[1] for p in proxies]
            listen, metrics_port = free_port(), free_port()
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            encoder = {"backend": "relay", "listen": f"127.0.0.1:{listen}", "spool": str(tmp / "spool")}
            points = [endpoint(p, name=f"remote-{n}", region=f"region-{n}")
                      for (n, _, _), p in zip(remotes, proxy_ports, strict=True)]  # fmt: skip
            profile = write_profile(
                tmp / "relay.toml", name="bench",
                streams={s: [{"kind": "video", "name": "video", "bitrate": 300_000, "width": 320, "height": 180,
                              "frame_rate": 25}] for s in streams},
                groups={"primary": group(*points, encoder=encoder), "backup": group(endpoint(proxy_ports[0]))},
                metrics={"enabled": True, "listen": f"127.0.0.1:{metrics_port}"})  # fmt: skip
            relay = start(["relay", str(profile), "--status", "log"], tmp / "relay.log")
            with trio.fail_after(30):
                await poll_until(lambda: get(f"http://127.0.0.1:{metrics_port}/status") is not None)
            idle_cpu, idle_wall = cpu_seconds(relay.pid), time.monotonic()
            await trio.sleep(5)
            idle = (cpu_seconds(relay.pid) - idle_cpu) / (time.monotonic() - idle_wall)
            result["relay_rss_idle_mib"] = memory_kib(relay.pid)[0] / 1024
            ffmpeg = shutil.which("ffmpeg") or "ffmpeg"
            for s in streams:
                argv = ismv_push_argv(f"http://127.0.0.1:{listen}/live/bench.isml/Streams({s})", total, ffmpeg=ffmpeg)
                encoders.append(await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                                                 stderr=subprocess.DEVNULL))  # fmt: skip
            busy_cpu, busy_wall = cpu_seconds(relay.pid), time.monotonic()
            await trio.sleep(args.warmup)

            proxies[0].set_fault(Fault.DOWN)
            print(f"remote a down for {args.outage} s", file=sys.stderr)
            await trio.sleep(args.outage)
            before = relay_last(metrics_url)
            heal = time.monotonic()
            proxies[0].heal()
            result["catch_up_one_s"] = {"a": round(await catch_up(heal, before, remotes[0][1], streams), 2)}
            await trio.sleep(max(0.0, args.gap - (time.monotonic() - heal)))

            for proxy in proxies:
                proxy.set_fault(Fault.DOWN)
            print(f"both remotes down for {args.outage} s", file=sys.stderr)
            await trio.sleep(args.outage)
            before = relay_last(metrics_url)
            heal = time.monotonic()
            for proxy in proxies:
                proxy.heal()
            result["catch_up_both_s"] = {}
            for name, port, _ in remotes:
                result["catch_up_both_s"][name] = round(await catch_up(heal, before, port, streams), 2)

            for process in encoders:
                await process.wait()
            busy = (cpu_seconds(relay.pid) - busy_cpu) / (time.monotonic() - busy_wall)
            rss, peak = memory_kib(relay.pid)
            result["ffmpeg_exit_codes"] = [p.returncode for p in encoders]
            # Drain: every remote has every fragment the relay forwarded (or 60 s pass).
            counts = metric(metrics_url, "orchestrator_relay_fragments_total")
            forwarded = {dict(k)["stream"]: v for k, v in counts.items() if dict(k)["outcome"] == "forwarded"}

            def drained() -> bool:
                return all(sum(t["fragments_archived"] for (s, _), t in archived(port, streams).items() if s == stream)
                           >= forwarded[stream] for _, port, _ in remotes for stream in streams)  # fmt: skip

            with trio.move_on_after(60):  # what is missing then is reported as lost
                await poll_until(drained, 0.2)
            lost: dict[str, Any] = {}
            for name, port, _ in remotes:
                tracks = archived(port, streams)
                missing = sum(forwarded[s] for s in streams) - sum(t["fragments_archived"] for t in tracks.values())
                frames = {f"{s}/{track}": holes(tmp / name / "live" / "bench" / s / f"{track}.mp4",
                                                FRAME if track == "video" else AAC_FRAME)
                          for s in streams for track in ("video", "audio")}  # fmt: skip
                lost[name] = {"fragments_missing": missing, "frame_holes": sum(h for _, h in frames.values()),
                              "packets": frames}  # fmt: skip
            result["fragments_forwarded"] = forwarded
            result["lost"] = lost
            dropped = metric(metrics_url, "orchestrator_dropped_fragments_total")
            result["dropped_by_backlog_bound"] = int(sum(dropped.values()))
            result["relay_cpu_idle_pct"] = round(100 * idle, 2)
            result["relay_cpu_busy_pct"] = round(100 * busy, 2)
            result["relay_cpu_pct_per_stream"] = round(100 * (busy - idle) / args.streams, 2)
            result["relay_rss_mib"] = round(rss / 1024, 1)
            result["relay_peak_rss_mib"] = round(peak / 1024, 1)
            result["relay_peak_rss_mib_per_stream"] = round((peak / 1024 - result["relay_rss_idle_mib"]) / args.streams,
                                                            1)  # fmt: skip
            result["relay_rss_idle_mib"] = round(result["relay_rss_idle_mib"], 1)
            nursery.cancel_scope.cancel()
    finally:
        for encoder_process in encoders:
            if encoder_process.poll() is None:
                encoder_process.kill()
        for process in [relay, *(p for _, _, p in remotes)]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    return result


def start_sink() -> tuple[subprocess.Popen[str], int]:
    sink = subprocess.Popen([sys.executable, "-m", "orchestrator.testing.countsink"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert sink.stdout is not None
    return sink, int(json.loads(sink.stdout.readline())["port"])


def sink_report(port: int) -> dict[str, Any]:
    report: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/report?clear=1", timeout=60).json()
    return report


def stop(process: subprocess.Popen[Any] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def scale(n: int, window: float, tmp: Path, fsync: str = "fragment") -> dict[str, Any]:
    """The relay at ``n`` streams: see the module docstring."""
    streams = {f"s{i}": [{"kind": "video", "name": "video", "bitrate": 800_000, "width": 640, "height": 360,
                          "frame_rate": "30000/1001"}] for i in range(n)}  # fmt: skip
    sinks = [start_sink() for _ in range(2)]
    relay = encoders = None
    try:
        listen, metrics_port = free_port(), free_port()
        relay_encoder = {"backend": "relay", "listen": f"127.0.0.1:{listen}", "spool": str(tmp / f"spool-{n}"),
                         "fsync": fsync}  # fmt: skip
        points = [endpoint(port, name=f"sink-{i}", region=f"region-{i}") for i, (_, port) in enumerate(sinks)]
        relay_profile = write_profile(tmp / f"relay-{n}.toml", name="scale", streams=streams,
                                      groups={"primary": group(*points, encoder=relay_encoder),
                                              "backup": group(points[0])},
                                      metrics={"enabled": True, "listen": f"127.0.0.1:{metrics_port}"})  # fmt: skip
        relay = start(["relay", str(relay_profile), "--status", "off"], tmp / f"relay-{n}.log")
        deadline = time.monotonic() + 60
        while get(f"http://127.0.0.1:{metrics_port}/status") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        idle_rss = memory_kib(relay.pid)[0]
        up_profile = write_profile(tmp / f"encoders-{n}.toml", name="scale", streams=streams,
                                   groups={g: group(endpoint(listen)) for g in ("primary", "backup")})  # fmt: skip
        started = time.monotonic()
        encoders = start(["up", str(up_profile), "--group", "primary", "--status", "off"], tmp / f"up-{n}.log")
        while time.monotonic() < started + 300:
            if all(sink_report(port)["open_posts"] >= n for _, port in sinks):
                break
            time.sleep(1)
        all_open = time.monotonic() - started
        time.sleep(4)  # two fragment durations: what queued while POSTs opened goes out
        for _, port in sinks:
            sink_report(port)  # clear
        cpu0, t0 = cpu_seconds(relay.pid), time.monotonic()
        time.sleep(window)
        cpu = (cpu_seconds(relay.pid) - cpu0) / (time.monotonic() - t0)
        reports = [sink_report(port) for _, port in sinks]
        rss, peak = memory_kib(relay.pid)
        due = n * window / 2
        return {
            "streams": n, "fsync": fsync, "posts_in": n, "posts_out": 2 * n, "all_open_s": round(all_open, 1),
            "posts_open_at_sinks": [r["open_posts"] for r in reports],
            "fragments_at_sinks_per_due": [round(len(r["fragments"]) / due, 3) for r in reports],
            "relay_cpu_pct": round(100 * cpu, 1), "relay_cpu_pct_per_stream": round(100 * cpu / n, 3),
            "relay_rss_mib": round(rss / 1024, 1), "relay_rss_kib_per_stream": round((rss - idle_rss) / n),
            "relay_peak_rss_mib": round(peak / 1024, 1),
        }  # fmt: skip
    finally:
        stop(encoders)
        stop(relay)
        for sink, _ in sinks:
            stop(sink)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2, help="ffmpeg encoders, one stream each (default 2)")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds each outage lasts (default 60)")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--gap", type=float, default=20.0, help="seconds between the two outages (default 20)")
    parser.add_argument("--tail", type=float, default=30.0, help="seconds of streaming after the second outage")
    parser.add_argument("--keep", type=Path, help="keep the archives and logs here")
    parser.add_argument("--scale", help="measure the relay at these stream counts instead (e.g. 100,300)")
    parser.add_argument("--window", type=float, default=30.0, help="with --scale: seconds measured (default 30)")
    parser.add_argument(
        "--fsync", choices=["fragment", "none"], default="fragment", help="with --scale: the spool's fsync policy"
    )
    args = parser.parse_args()
    if args.scale:
        print(f"load: {os.getloadavg()}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            for n in (int(x) for x in args.scale.split(",")):
                print(json.dumps(scale(n, args.window, Path(tmp), args.fsync)), flush=True)
        print(f"load: {os.getloadavg()}", file=sys.stderr)
        return
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = trio.run(run, args, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = trio.run(run, args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
