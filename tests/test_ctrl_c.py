"""Ctrl-C in a terminal, as it really happens: SIGINT to the whole foreground process group of
``orchestrator up``, real ffmpeg encoders included.

ffmpeg runs in its own session, so the signal reaches only the orchestrator, which stops
gracefully: no encoder failure or restart is logged, every group finishes the fragment in flight
(the ``final_index`` it announced is in the archive of every track), and the process exits 0
within the stop bound (``shutdown_grace``, 10 s). Before ffmpeg had its own session it died
with the terminal's SIGINT (exit 255): ``ERROR encoder.failed``, ``encoder.restarting``, a new
ffmpeg during shutdown, ``encoder.finish.timeout`` and a 6.8 s stop.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from rig import demo_profile, free_port, get_status, wait_until

from orchestrator.fmp4.reader import NEED_DATA, Fragment, StreamReader

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg: apt-get install ffmpeg (see README)"),
]

STOP_BOUND = 10.0  # UpOptions.shutdown_grace, the CLI's default


def archived_indices(path: Path) -> list[int]:
    reader = StreamReader()
    reader.feed(path.read_bytes())
    indices = []
    while (event := reader.next_event()) is not NEED_DATA:
        if isinstance(event, Fragment):
            indices.append(event.parsed.sequence_number)
    return indices


def test_ctrl_c_to_the_process_group_stops_cleanly_with_ffmpeg_untouched(tmp_path: Path, orchestrators):
    ports = [free_port(), free_port()]
    profile = demo_profile(tmp_path / "event.toml", (ports[0], ports[1]), metrics=f"127.0.0.1:{free_port()}",
                           state_dir=tmp_path / "state", encoder="ffmpeg")  # fmt: skip
    # Its own session, as a shell gives a foreground job its own process group: the group is
    # what a terminal signals, and the test's own process is not in it.
    orchestrator = orchestrators("up", str(profile), "--local-ingest", str(tmp_path / "archive"), "--status", "log",
                                 log="up.log", start_new_session=True)  # fmt: skip
    up, log = orchestrator.process, orchestrator.log

    def fragments(port: int, group: str) -> int:
        status = get_status(port, posts=True) or {"post_log": []}
        return min(
            [sum(len(p["fragments"]) for p in status["post_log"] if p["encoder_group"] == group and
                 p["stream"] == stream) for stream in ("video", "audio")])  # fmt: skip

    wait_until(lambda: all(fragments(p, g) >= 3 for p in ports for g in ("primary", "backup")), 60,
               "3 fragments per stream from both groups at both endpoints", [log])  # fmt: skip
    assert up.poll() is None
    before = len(log.read_bytes())
    signalled = time.monotonic()
    os.killpg(up.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    code = up.wait(STOP_BOUND + 5)
    took = time.monotonic() - signalled
    after = log.read_bytes()[before:].decode()
    assert code == 0, after[-3000:]
    assert took <= STOP_BOUND, f"stopped in {took:.1f} s"
    assert "supervisor.signal signal=SIGINT action=graceful_stop" in after
    for bad in (" ERROR ", "encoder.failed", "encoder.restarting", "encoder.finish.timeout", "action=cancel_now",
                "Traceback"):  # fmt: skip
        assert bad not in after, f"{bad.strip()!r} after Ctrl-C:\n{after[-3000:]}"
    assert after.count("ffmpeg.starting") == 0, "an ffmpeg was started during the shutdown"
    finals = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"encoder\.finishing group=(\w+) final_index=(\d+)", after)
    }
    assert set(finals) == {"primary", "backup"}
    # The fragment in flight was finished and delivered: every track's archive, at both
    # endpoints, holds the last final index.
    files = sorted((tmp_path / "archive").glob("*/live/demo/*/*.mp4"))
    assert len(files) == 4, files  # 2 endpoints x 2 streams x 1 track
    for path in files:
        indices = archived_indices(path)
        assert max(finals.values()) in indices, f"{path}: {indices[-3:]}, final {finals}"
