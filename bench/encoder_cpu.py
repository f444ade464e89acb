"""CPU cost of the orchestrator itself per stream, next to ffmpeg's encoding cost.

Runs ``orchestrator up`` (primary and backup groups) as a subprocess against a separate
``orchestrator ingest`` process on loopback, with the presentation of tests/test_ffmpeg.py (two
video renditions, 360p and 180p at 29.97 fps, one AAC track; three streams, the audio carried
twice), first on the ffmpeg backend and then, as the baseline in the same run, on the synthetic
backend (no encoding at all: what remains is the orchestrator's own work: gating, state,
outboxes, HTTP). After a warm-up it reads the CPU time (user + system, from /proc) of the ``up``
process and of its ffmpeg children over a measurement window and prints it as a percentage of
one core, and the peak resident memory (VmHWM) of the ``up`` process and of the largest ffmpeg
instance (one per group), which deploy/kubernetes sizes its pods from.

    .venv/bin/python bench/encoder_cpu.py [--seconds 20]

Linux only (/proc). Needs ffmpeg. The machine is shared and noisy: compare the columns of one
run, not runs with each other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.testing.profiles import SYNTHETIC, ladder, profile_text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rig import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
STREAMS = 3
GROUPS = 2


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size (VmHWM), MiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def measure(backend: str, seconds: float, workdir: Path) -> tuple[float, float, float, float]:
    port = free_port()
    keys = ladder(port)  # the same presentation as the integration test (tests/encode/test_ffmpeg.py)
    if backend == "synthetic":
        for group in keys["groups"].values():
            group["encoder"] = dict(SYNTHETIC)
    text = profile_text(**keys)
    profile = workdir / f"{backend}.toml"
    profile.write_text(text)
    exe = [sys.executable, "-m", "orchestrator"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    ingest = subprocess.Popen([*exe, "ingest", "--listen", f"127.0.0.1:{port}", "--archive",
                               str(workdir / f"archive-{backend}")], **quiet)  # fmt: skip
    time.sleep(1.5)
    up = subprocess.Popen([*exe, "up", str(profile), "--status", "off"], **quiet)
    try:
        time.sleep(8.0)  # start-up, first fragments, connections open
        kids = children(up.pid)
        up0, kids0 = cpu_seconds(up.pid), sum(cpu_seconds(k) for k in kids)
        t0 = time.monotonic()
        time.sleep(seconds)
        up1, kids1 = cpu_seconds(up.pid), sum(cpu_seconds(k) for k in kids)
        elapsed = time.monotonic() - t0
        up_rss, kid_rss = peak_rss_mib(up.pid), max((peak_rss_mib(k) for k in kids), default=0.0)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(30)
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(30)
    return 100 * (up1 - up0) / elapsed, 100 * (kids1 - kids0) / elapsed, up_rss, kid_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window (default 20)")
    args = parser.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("needs ffmpeg: apt-get install ffmpeg")
    print(f"# {GROUPS} groups x {STREAMS} streams (360p + 180p H.264, AAC), {args.seconds:g} s window, % of one core")
    print(f"{'backend':10} {'orchestrator':>12} {'per_stream':>10} {'ffmpeg':>8} {'ffmpeg/orch':>11}"
          f" {'orch_MiB':>9} {'ffmpeg_MiB':>10}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("ffmpeg", "synthetic"):
            orch, ffmpeg, orch_rss, ffmpeg_rss = measure(backend, args.seconds, Path(tmp))
            ratio = f"{ffmpeg / orch:.1f}" if orch > 0 and ffmpeg > 0 else "-"
            print(f"{backend:10} {orch:12.1f} {orch / (STREAMS * GROUPS):10.2f} {ffmpeg:8.1f} {ratio:>11}"
                  f" {orch_rss:9.0f} {ffmpeg_rss:10.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
