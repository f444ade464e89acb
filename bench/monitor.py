"""Monitor benchmark: what the confidence monitor costs ``up``, with its page open and closed.

Not a test: it prints figures. One ``orchestrator up`` (a separate process, as in production)
runs ``--streams`` streams (default 30), each a 640x360 video track and a 48 kHz stereo audio
track from the synthetic encoder (2 s fragments), in two groups, primary and backup, each
pushing every stream to the counting sink (``orchestrator.testing.countsink``): 60 tiles on
the page, 30 rows of two.

Phases of ``--window`` seconds each, in one run, CPU of ``up`` *and of the ffmpeg decodes it
ran* (utime + stime + the reaped children's cutime + cstime, from /proc) and its resident
memory at the end of each phase:

  disabled   ``[monitor] enabled = false`` (a separate ``up`` of the same profile: the baseline)
  closed     the monitor on, no page open (the viewer lease never taken)
  open       a page open: a client that does what monitor.js does, GET /monitor.json every
             poll_seconds and each thumbnail whose URL changed
  closed2    the page closed again, after its lease lapsed (the kept fragments are let go)

CPU is split into ``up`` itself and the ffmpeg processes it ran (reaped children).

and the ratios closed / disabled and open / closed. The decodes the monitor counted (decoded,
failed, timed out) and the thumbnails fetched are printed with the open phase. The machine's
load (``uptime``) is printed first and last: other work on the machine shows in every figure.

Run:  .venv/bin/python bench/monitor.py [--streams 30] [--window 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from orchestrator.testing.profiles import audio, endpoint, group, profile_text, video

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rig import free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime): the process, and the children it reaped (the decodes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 1e6


def write_profile(path: Path, streams: int, sink_port: int, metrics_port: int, *, enabled: bool) -> Path:
    table = {g: group(endpoint(url=f"http://127.0.0.1:{sink_port}/{g}/bench.isml", name="sink", region="here"))
             for g in ("primary", "backup")}  # fmt: skip
    path.write_text(profile_text(
        name="bench", groups=table, streams={f"s{i:02d}": [video(), audio()] for i in range(streams)},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        extra=f"[monitor]\nenabled = {'true' if enabled else 'false'}"))  # fmt: skip
    return path


def start_sink() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.testing.countsink"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def start_up(profile: Path, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--log-level", "warning", "up", str(profile), "--status", "off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, text=True)  # fmt: skip


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(base: str, up: subprocess.Popen[str], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise SystemExit(f"up exited ({up.returncode}):\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"up not ready after {timeout} s:\n{log.read_text()[-2000:]}")


def measure(pid: int, window: float, during: object = None) -> dict[str, float]:
    """CPU % of one core over ``window`` s and RSS at its end; ``during(deadline)`` runs meanwhile."""
    (own0, children0), t0 = cpu_seconds(pid), time.monotonic()
    if callable(during):
        during(t0 + window)
    else:
        time.sleep(window)
    (own1, children1), t1 = cpu_seconds(pid), time.monotonic()
    own, children = 100 * (own1 - own0) / (t1 - t0), 100 * (children1 - children0) / (t1 - t0)
    return {"cpu_%": own + children, "up_%": own, "ffmpeg_%": children, "rss_MB": rss_mb(pid)}


class Page:
    """What monitor.js does: poll /monitor.json, fetch each thumbnail whose URL changed."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.client = httpx.Client(timeout=10)
        self.shown: dict[tuple[str, str], str] = {}
        self.thumbnails = 0
        self.polls = 0
        self.last: dict[str, object] = {}

    def __call__(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            document = self.client.get(f"{self.base}/monitor.json").json()
            self.polls += 1
            self.last = document
            for stream in document["streams"]:
                for tile in stream["tiles"]:
                    picture = tile.get("picture") or {}
                    url = picture.get("url")
                    key = (stream["stream"], tile["group"])
                    if url and self.shown.get(key) != url:
                        self.client.get(f"{self.base}{url}")
                        self.shown[key] = url
                        self.thumbnails += 1
            time.sleep(max(0.0, min(float(document["poll_seconds"]), deadline - time.monotonic())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after ready before measuring")
    args = parser.parse_args()
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp_name:
        tmp = Path(tmp_name)
        sink = start_sink()
        assert sink.stdout is not None
        sink_port = json.loads(sink.stdout.readline())["port"]
        try:
            for enabled in (False, True):
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                profile = write_profile(tmp / f"bench-{enabled}.toml", args.streams, sink_port, port, enabled=enabled)
                log = tmp / f"up-{enabled}.log"
                up = start_up(profile, log)
                try:
                    wait_ready(base, up, log)
                    time.sleep(args.settle)
                    if not enabled:
                        results["disabled"] = measure(up.pid, args.window)
                        continue
                    results["closed"] = measure(up.pid, args.window)
                    page = Page(base)
                    results["open"] = measure(up.pid, args.window, page)
                    decodes = page.last.get("decodes", {})
                    lapse = 8.0  # the lease (5 s at 2 s fragments), the decoder's next check, a batch in flight
                    time.sleep(lapse)
                    results["closed2"] = measure(up.pid, args.window)
                finally:
                    stop(up)
        finally:
            stop(sink)
    print(f"streams={args.streams} tiles={2 * args.streams} window={args.window:g}s fragment=2s")
    print(f"{'phase':<10} {'cpu_%':>7} {'(up':>7} {'ffmpeg)':>8} {'rss_MB':>8}")
    for phase, r in results.items():
        print(f"{phase:<10} {r['cpu_%']:7.1f} {r['up_%']:7.1f} {r['ffmpeg_%']:8.1f} {r['rss_MB']:8.1f}")
    print(f"closed/disabled  cpu {results['closed']['cpu_%'] / results['disabled']['cpu_%']:.2f}  "
          f"rss {results['closed']['rss_MB'] / results['disabled']['rss_MB']:.2f}")  # fmt: skip
    print(f"open/closed      cpu {results['open']['cpu_%'] / results['closed']['cpu_%']:.2f}  "
          f"rss {results['open']['rss_MB'] / results['closed']['rss_MB']:.2f}")  # fmt: skip
    print(f"closed2/closed   cpu {results['closed2']['cpu_%'] / results['closed']['cpu_%']:.2f}")
    print(f"open phase: polls={page.polls} thumbnails_fetched={page.thumbnails} decodes={decodes}")
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
