"""``orchestrator status`` (the real CLI, a subprocess) against a real ``up``'s /status on
loopback: the view, and its exit code: 0 all streaming, 1 an endpoint down, 3 unreadable."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from opsrig import ops_up
from rig import wait_for

from orchestrator.testing.faultproxy import Fault

pytestmark = pytest.mark.integration


async def status(*args: str, columns: str | None = "200") -> subprocess.CompletedProcess[bytes]:
    """``orchestrator status ARGS`` with its output in a pipe (not a terminal), ``COLUMNS`` set to
    ``columns`` (None: unset, as under ``kubectl exec`` without ``-t``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update({"NO_COLOR": "1", "TERM": "dumb"} | ({} if columns is None else {"COLUMNS": columns}))
    return await trio.run_process([sys.executable, "-m", "orchestrator", "status", *args], capture_stdout=True,
                                  capture_stderr=True, check=False, env=env)  # fmt: skip


def table_rows(out: str) -> list[list[str]]:
    """The table's body lines, as cells (a wrapped cell continues on a line with empty cells)."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def cells_index(out: str, stream: str) -> tuple[str, str]:
    """The stream's index and its shared-clock time (HH:MM:SS), as the table shows them."""
    ((index, clock),) = [cells[1:3] for cells in table_rows(out) if cells[0] == stream]
    assert index.isdigit()
    assert re.fullmatch(r"\d\d:\d\d:\d\d", clock)
    return index, clock


async def test_status_view_and_exit_codes(tmp_path: Path) -> None:
    async with ops_up(tmp_path) as (running, proxy, base_url):

        async def all_streaming() -> bool:
            return len(running.publishers) == 6 and all(p.connected for p in running.publishers)

        await wait_for(all_streaming, 20, "every endpoint streaming")
        ok = await status("--url", base_url)
        out = ok.stdout.decode()
        assert ok.returncode == 0, out + ok.stderr.decode()
        assert "orchestrator: ops" in out
        assert "ready" in out
        assert [cells[:7] for cells in table_rows(out) if cells[4]] == [
            ["video", *cells_index(out, "video"), "primary", "region-a", "eu-west", "streaming"],
            ["", "", "", "", "region-b", "us-east", "streaming"],
            ["", "", "", "backup", "region-a", "eu-west", "streaming"],
            ["audio", *cells_index(out, "audio"), "primary", "region-a", "eu-west", "streaming"],
            ["", "", "", "", "region-b", "us-east", "streaming"],
            ["", "", "", "backup", "region-a", "eu-west", "streaming"],
        ]  # fmt: skip

        # Piped with no COLUMNS (kubectl exec without -t): the full table at its own width, not cut at 80.
        piped = (await status("--url", base_url, columns=None)).stdout.decode()
        assert [cells[4] for cells in table_rows(piped) if cells[4]] == ["region-a", "region-b", "region-a"] * 2
        assert max(len(line) for line in piped.splitlines()) > 80
        assert "…" not in piped
        # COLUMNS=80 (an 80x24 terminal): the compact layout, every line within 80 columns.
        narrow = (await status("--url", base_url, columns="80")).stdout.decode()
        assert max(len(line) for line in narrow.splitlines()) <= 80, narrow
        a, b = ["region-a", "eu-west", "streaming", "0"], ["region-b", "us-east", "streaming", "0"]
        assert [line.split()[-4:] for line in narrow.splitlines() if "streaming" in line] == [a, b, a] * 2
        assert narrow.splitlines()[0].startswith("orchestrator: ops ")

        # --watch redraws until Ctrl-C, then exits with the last state seen.
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
        # Its output goes to a file: a pipe nobody reads fills up (64 KiB: a few seconds of
        # redraws) and blocks the redraw, and then the Ctrl-C too.
        # SIGINT at its default in the child, as in a terminal: a test run started in the
        # background (`bash .ci/run &`, nohup) inherits SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler, so the Ctrl-C below would go unheard.
        with (tmp_path / "watch.out").open("wb") as output:
            watch = await trio.lowlevel.open_process(
                [sys.executable, "-m", "orchestrator", "status", "--url", base_url, "--watch", "--interval", "0.2"],
                stdout=output, stderr=subprocess.STDOUT, env=env,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
            try:
                await trio.sleep(3)
                watch.send_signal(signal.SIGINT)
                with trio.fail_after(10):
                    assert await watch.wait() == 0
            finally:
                if watch.returncode is None:  # failed: leave no process behind for the next test
                    watch.kill()
                    await watch.wait()
        watched = (tmp_path / "watch.out").read_text()
        assert "region-b" in watched

        proxy.set_fault(Fault.DOWN)

        async def region_b_failing() -> bool:
            return any(p.endpoint == "region-b" and p.problem == "transport" for p in running.publishers)

        await wait_for(region_b_failing, 15, "region-b failing")
        bad = await status("--url", base_url)
        out = bad.stdout.decode()
        assert bad.returncode == 1, out + bad.stderr.decode()
        region_b = [cells for cells in table_rows(out) if cells[4] == "region-b"]
        assert [cells[6].split()[:2] for cells in region_b] == [["reconnecting", "since"]] * 2
        assert "region-a" in out
        assert "down:" in out
        assert "stream video group primary endpoint region-b (us-east): reconnecting" in out
        assert "connection" in out  # the last error, in its column

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = await status("--url", f"http://127.0.0.1:{port}")
    assert gone.returncode == 3
    assert f"cannot read http://127.0.0.1:{port}/status" in gone.stdout.decode()
