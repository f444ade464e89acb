"""The live table of the demo's ``up`` as a person sees it in an 80x24 terminal: a real tmux pane
(its own server on its own socket), the real CLI with ffmpeg, read back with ``capture-pane``.

While streaming, every line fits in 80 columns, with the compact layout: each endpoint by its
whole name and region, each stream's index beside that fragment's shared-clock time (checked
against the epoch), a footer naming the --log-file. After Ctrl-C: a last frame that says
"stopped" (not "encoder down", not "not ready"), then the summary (fragments pushed per endpoint,
where the archive and the state are), and exit code 0. With an endpoint unreachable, its state
and each group's last error are on screen, within the 80 columns.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rig import EPOCH, demo_profile, free_port, tails

NEEDS = "needs tmux and ffmpeg: apt-get install tmux ffmpeg"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("tmux") or not shutil.which("ffmpeg"), reason=NEEDS),
]

ROW = re.compile(r"^ *(?:(video|audio) +(\d+) +(\d\d:\d\d:\d\d) +)?(?:(primary|backup) +)?"
                 r"(region-[ab]) +(eu-west|us-east) +(\S.*?) +(\d+)$")  # fmt: skip


# Runs the command given after the exit file's path and writes its exit code there (a killing
# signal as its negative), by rename so a reader never sees half of it.
EXIT_RECORDER = """
import os, signal, subprocess, sys
signal.signal(signal.SIGINT, lambda signum, frame: None)
code = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1] + ".part", "w") as out:
    out.write(str(code))
os.replace(sys.argv[1] + ".part", sys.argv[1])
"""


class Pane:
    """One tmux server (its own socket under the test's directory) with one 80x24 pane."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = tmp_path / "tmux.sock"
        config = tmp_path / "tmux.conf"
        config.write_text("set -g remain-on-exit on\nset -g history-limit 5000\n")  # the last frame outlives `up`
        self.base = ["tmux", "-S", str(self.socket), "-f", str(config)]
        self.exit_file = tmp_path / "pane.exit"

    def tmux(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True, timeout=30).stdout

    def start(self, cwd: Path, argv: list[str]) -> None:
        # The command runs under a small parent that writes its exit status to a file: tmux 3.3a
        # sometimes misses the SIGCHLD of a pane's process (seen here: the process a zombie for a
        # minute, `#{pane_dead}` 1 and `#{pane_dead_status}` empty), so its status cannot be waited
        # for through tmux. The parent stays in the pane's process group with a no-op SIGINT
        # handler (not SIG_IGN, which the command would inherit), so Ctrl-C reaches the command
        # alone, on the same terminal.
        self.exit_file.unlink(missing_ok=True)
        self.tmux("new-session", "-d", "-s", "up", "-x", "80", "-y", "24", "-c", str(cwd),
                  sys.executable, "-c", EXIT_RECORDER, str(self.exit_file), *argv)  # fmt: skip

    def screen(self, history: bool = False) -> list[str]:
        text = self.tmux("capture-pane", "-p", "-t", "up", *(["-S", "-", "-E", "-"] if history else []))
        return text.rstrip("\n").split("\n")  # without the blank rows under the last line drawn

    def dead(self) -> int | None:
        """The exit code of the pane's command once it has ended (minus the signal if one killed
        it), else None."""
        try:
            return int(self.exit_file.read_text())
        except (FileNotFoundError, ValueError):  # not ended, or the status half written
            return None

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def wait_screen(pane: Pane, done, timeout: float, what: str, log: Path) -> list[str]:
    """Poll the pane until ``done(lines)``; fail at once, with the screen and the log, if ``up``
    exits first, or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        lines = pane.screen()
        if done(lines):
            return lines
        code = pane.dead()
        if code is not None or time.monotonic() > deadline:
            why = f"up exited {code}" if code is not None else f"timed out after {timeout} s"
            screen = "\n".join(pane.screen(history=True))
            pytest.fail(f"{why} waiting for {what}; the pane:\n{screen}\n{tails([log])}")
        time.sleep(0.5)


def streaming(lines: list[str]) -> bool:
    return any(line.endswith("UTC  ready") for line in lines) and sum(" streaming " in line for line in lines) == 8


def test_the_demo_table_fits_an_80x24_terminal_and_ctrl_c_leaves_a_clean_last_frame(tmp_path: Path) -> None:
    ports = (free_port(), free_port())
    demo_profile(tmp_path / "event.toml", ports, metrics=f"127.0.0.1:{free_port()}", state_dir=Path("state"),
                 encoder="ffmpeg")  # fmt: skip
    pane = Pane(tmp_path)
    log = tmp_path / "up.log"
    try:
        pane.start(tmp_path, [sys.executable, "-m", "orchestrator", "--log-file", "up.log", "up", "event.toml",
                              "--local-ingest", "archive"])  # fmt: skip
        lines = wait_screen(pane, streaming, 90, "every endpoint streaming", log)
        assert len(lines) <= 24
        assert all(len(line) <= 80 for line in lines)
        top = next(i for i, line in enumerate(lines) if line.startswith("orchestrator: demo "))
        assert lines[top + 1].split() == ["stream", "index", "clock", "group", "endpoint", "region", "state", "drops"]
        rows = [ROW.match(line) for line in lines[top + 3 : top + 11]]
        assert all(rows), "\n".join(lines)
        assert [(m[5], m[6], m[7]) for m in rows] == [  # type: ignore[index]
            ("region-a", "eu-west", "streaming"), ("region-b", "us-east", "streaming")] * 4  # fmt: skip
        assert [m[4] for m in rows if m[4]] == ["primary", "backup"] * 2  # type: ignore[index]
        for m in (rows[0], rows[4]):
            assert m is not None
            index, clock = int(m[2]), m[3]
            start = EPOCH + dt.timedelta(seconds=2 * index)
            assert clock == start.strftime("%H:%M:%S"), "the clock column is the index's shared-clock time"
        # The footer, true to the flags: INFO is in the --log-file given.
        assert lines[-1] == "warnings and errors print above; the whole log is in up.log"
        assert "…" not in "\n".join(lines[top : top + 11])

        pane.tmux("send-keys", "-t", "up", "C-c")
        deadline = time.monotonic() + 30
        while (code := pane.dead()) is None:
            assert time.monotonic() < deadline, "up did not exit within 30 s of Ctrl-C"
            time.sleep(0.5)
        assert code == 0, "\n".join(pane.screen(history=True)) + tails([log])
        history = pane.screen(history=True)
    finally:
        pane.kill()

    last = max(i for i, line in enumerate(history) if line.startswith("orchestrator: demo "))
    end = history[last:]
    assert re.fullmatch(r"orchestrator: demo  \d\d:\d\d:\d\d UTC  stopped", end[0])
    assert [ROW.match(line)[7] for line in end[3:11]] == ["stopped"] * 8  # type: ignore[index]
    assert not any(word in line for line in end for word in ("down", "not ready", "Traceback"))
    summary = end[end.index(next(x for x in end if x.startswith("stopped at "))) :]
    assert re.fullmatch(r"stopped at \d\d:\d\d:\d\d UTC after \d+s; fragments pushed:", summary[0])
    pushed = [re.fullmatch(r"  (primary|backup) -> (region-[ab]) \((eu-west|us-east)\): video (\d+), audio (\d+)", x)
              for x in summary[1:5]]  # fmt: skip
    assert all(pushed), summary
    assert [(m[1], m[2]) for m in pushed] == [  # type: ignore[index]
        ("primary", "region-a"), ("primary", "region-b"), ("backup", "region-a"), ("backup", "region-b")]  # fmt: skip
    assert all(int(m[4]) >= 1 and int(m[5]) >= 1 for m in pushed)  # type: ignore[index]
    assert summary[5] == "archive (one fragmented MP4 per track):"
    archives = sorted(x.strip() for x in summary[6:8])
    assert archives == sorted(f"archive/127.0.0.1-{port}" for port in ports)
    for archive in archives:
        assert sorted(p.name for p in (tmp_path / archive).rglob("*.mp4")) == ["audio_eng.mp4", "video_360p.mp4"]
    assert summary[8] == "state, where the next up continues the timeline: state"
    assert "supervisor.stopped" in log.read_text()  # the INFO went to --log-file, not over the table


def test_an_unreachable_endpoint_and_the_last_errors_fit_an_80x24_terminal(tmp_path: Path, ingest_server) -> None:
    region_a = ingest_server("region-a")
    closed = free_port()  # region-b: nothing listens there
    demo_profile(tmp_path / "event.toml", (region_a.port, closed), metrics=f"127.0.0.1:{free_port()}",
                 state_dir=Path("state"), encoder="synthetic")  # fmt: skip
    pane = Pane(tmp_path)
    log = tmp_path / "up.log"

    def failing(lines: list[str]) -> bool:
        states = [m[7] for m in map(ROW.match, lines) if m]
        notes = [line for line in lines if ": last error " in line]
        return (
            states.count("streaming") == 4
            and len(notes) == 2
            and sum(s.startswith("reconnecting") for s in states) == 4
        )

    try:
        pane.start(tmp_path, [sys.executable, "-m", "orchestrator", "--log-file", "up.log", "up", "event.toml"])
        lines = wait_screen(pane, failing, 90, "region-b reconnecting and both groups' last error", log)
        top = next(i for i, line in enumerate(lines) if line.startswith("orchestrator: demo "))
        assert lines[top].endswith("UTC  ready"), "one endpoint per group and stream streams: ready"
        rows = [ROW.match(line) for line in lines[top + 3 : top + 11]]
        assert all(rows), "\n".join(lines)
        assert [(m[5], m[6]) for m in rows] == [("region-a", "eu-west"), ("region-b", "us-east")] * 4  # type: ignore[index]
        for m in rows[1::2]:  # region-b: since how long, and (if the width holds it) its backlog; never wrapped
            assert re.fullmatch(r"reconnecting \d+s(, backlog \d+s)?|reconnecting \d+s[^ ]*…", m[7]), m[7]  # type: ignore[index]
        notes = [line for line in lines if ": last error " in line]
        assert [line.split(":")[0] for line in notes] == ["primary", "backup"]
        for note in notes:
            assert re.match(r"(primary|backup): last error \d\d:\d\d:\d\d \(\d+s ago\) region-b: \S", note), note
        pane.tmux("send-keys", "-t", "up", "C-c")
        deadline = time.monotonic() + 30
        while (code := pane.dead()) is None:
            assert time.monotonic() < deadline, "up did not exit within 30 s of Ctrl-C"
            time.sleep(0.5)
        assert code == 0, "\n".join(pane.screen(history=True)) + tails([log])
        history = pane.screen(history=True)
    finally:
        pane.kill()
    end = history[max(i for i, line in enumerate(history) if line.startswith("orchestrator: demo ")) :]
    assert end[0].endswith("UTC  stopped")
    assert [ROW.match(line)[7] for line in end[3:11]] == ["stopped"] * 8  # type: ignore[index]
    assert "  primary -> region-b (us-east): video 0, audio 0" in end
    assert "  backup -> region-b (us-east): video 0, audio 0" in end
