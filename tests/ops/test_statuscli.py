"""``orchestrator status`` (the real CLI, a subprocess) against a real ``up``'s /status on
loopback: the view, and its exit code: 0 all streaming, 1 an endpoint down, 3 unreadable."""

from __future__ import annotations

import os
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


async def status(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return await trio.run_process([sys.executable, "-m", "orchestrator", "status", *args], capture_stdout=True,
                                  capture_stderr=True, check=False, env=env)  # fmt: skip


def table_rows(out: str) -> list[list[str]]:
    """The table's body lines, as cells (a wrapped cell continues on a line with empty cells)."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def cells_index(out: str, stream: str) -> str:
    (index,) = [cells[1] for cells in table_rows(out) if cells[0] == stream]
    assert index.isdigit()
    return index


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
        assert [cells[:6] for cells in table_rows(out) if cells[3]] == [
            ["video", cells_index(out, "video"), "primary", "region-a", "eu-west", "streaming"],
            ["", "", "", "region-b", "us-east", "streaming"],
            ["", "", "backup", "region-a", "eu-west", "streaming"],
            ["audio", cells_index(out, "audio"), "primary", "region-a", "eu-west", "streaming"],
            ["", "", "", "region-b", "us-east", "streaming"],
            ["", "", "backup", "region-a", "eu-west", "streaming"],
        ]  # fmt: skip

        # --watch redraws until Ctrl-C, then exits with the last state seen.
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
        # Its output goes to a file: a pipe nobody reads fills up (64 KiB: a few seconds of
        # redraws) and blocks the redraw, and then the Ctrl-C too.
        with (tmp_path / "watch.out").open("wb") as output:
            watch = await trio.lowlevel.open_process(
                [sys.executable, "-m", "orchestrator", "status", "--url", base_url, "--watch", "--interval", "0.2"],
                stdout=output, stderr=subprocess.STDOUT, env=env)  # fmt: skip
            await trio.sleep(3)
            watch.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                assert await watch.wait() == 0
        watched = (tmp_path / "watch.out").read_text()
        assert "region-b" in watched

        proxy.set_fault(Fault.DOWN)

        async def region_b_failing() -> bool:
            return any(p.endpoint == "region-b" and p.problem == "transport" for p in running.publishers)

        await wait_for(region_b_failing, 15, "region-b failing")
        bad = await status("--url", base_url)
        out = bad.stdout.decode()
        assert bad.returncode == 1, out + bad.stderr.decode()
        region_b = [cells for cells in table_rows(out) if cells[3] == "region-b"]
        assert [cells[5].split()[:2] for cells in region_b] == [["reconnecting", "since"]] * 2
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
