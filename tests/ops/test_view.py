"""The operator's view rendered from a /status document: the table cells and the log lines,
exact; and the console kept to warnings while the live table is shown."""

from __future__ import annotations

import logging
import sys

from opsrig import NOW_MONO, NOW_WALL, live
from rich.console import Console

from orchestrator.ops.state import GroupState
from orchestrator.ops.status import status_document
from orchestrator.ops.view import ConsoleLogHandler, age, console_warnings_only, endpoint_text, lines, table


def document(state=None):
    return status_document(state or live(), now_wall=NOW_WALL, now_monotonic=NOW_MONO)


def test_log_lines_name_each_endpoint_region_state_and_error() -> None:
    assert lines(document()) == [
        "stream=video index=41 group=primary encoder=up region-a/eu-west=streaming "
        "region-b/us-east=reconnecting_for_30s,backlog_28s restarts=2 dropped=0 "
        "last_error='07:59:58 (2s ago) region-b: connection failed: ConnectError'",
        "stream=video index=42 group=backup encoder=up region-a/eu-west=streaming restarts=0 dropped=0",
    ]


def test_endpoint_texts() -> None:
    doc = document()
    a, b = doc["streams"][0]["groups"][0]["endpoints"]
    assert endpoint_text(a, doc["time"]) == "region-a (eu-west): streaming"
    assert endpoint_text(b, doc["time"]) == "region-b (us-east): reconnecting since 07:59:30 (30s), backlog 28 s"
    b["state"], b["backlog_seconds"] = "unauthorised", 0.4
    assert endpoint_text(b, doc["time"]) == "region-b (us-east): unauthorised since 07:59:30 (30s)"
    assert [age(s) for s in (0.4, 89, 600, 7200, -3)] == ["0s", "89s", "10m", "2.0h", "0s"]


def test_table_cells() -> None:
    state = live()
    error = "exited: ffmpeg exited with code 1"
    state.groups[0] = GroupState("primary", up=False, restarts=3, last_exit_code=1, last_error=error,
                                 last_error_wall=NOW_WALL - 1)  # fmt: skip
    state.publishers[1].dropped = 4
    console = Console(width=220, record=True, color_system=None)
    console.print(table(document(state)))
    text = console.export_text()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    assert cells == [
        ["video", "42", "primary encoder down", "region-a", "eu-west", "streaming", "3 (exit 1)", "4",
         "07:59:59 (1s ago) encoder: exited: ffmpeg exited with code 1"],
        ["", "", "", "region-b", "us-east", "reconnecting since 07:59:30 (30s), backlog 28 s", "", "", ""],
        ["", "", "backup", "region-a", "eu-west", "streaming", "0", "0", ""],
    ]  # fmt: skip
    assert "not ready: group primary: encoder down" in text
    assert "orchestrator: demo  08:00:00 UTC" in text


def test_console_keeps_warnings_only_while_the_table_is_shown() -> None:
    root = logging.getLogger()
    console = ConsoleLogHandler(sys.stderr)
    other = logging.StreamHandler(sys.stderr)  # a file or another sink keeps everything
    root.addHandler(console)
    root.addHandler(other)
    try:
        with console_warnings_only():
            assert (console.level, other.level) == (logging.WARNING, logging.NOTSET)
        assert console.level == logging.NOTSET
    finally:
        root.removeHandler(console)
        root.removeHandler(other)
