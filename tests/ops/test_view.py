"""The operator's view rendered from a /status document: the table cells, the compact layout of
an 80-column terminal, the stopping and stopped frames, the summary, the footer and the log lines,
exact; and the console kept to warnings while the live table is shown."""

from __future__ import annotations

import logging
import sys
from fractions import Fraction
from pathlib import Path

from opsrig import NOW_MONO, NOW_WALL, live
from rich.console import Console

from orchestrator.ops.state import EncoderState, GroupState, LiveState, PublisherState
from orchestrator.ops.status import index_time, status_document
from orchestrator.ops.view import (
    ConsoleLogHandler,
    age,
    console_warnings_only,
    endpoint_text,
    footer_text,
    lines,
    summary,
    table,
    view,
)


def document(state=None):
    return status_document(state or live(), now_wall=NOW_WALL, now_monotonic=NOW_MONO)


def demo_like() -> LiveState:
    """The demo's shape: two streams, two groups, two endpoints each (region-a, region-b); the
    primary's region-b reconnecting with a backlog, the primary's encoder restarted twice."""
    state = live()
    state.encoders[0].last_index = 14_614_322
    state.encoders[1].last_index = 14_614_322
    for e in state.encoders:
        e.lock = "pattern"
    state.encoders += [EncoderState(g, "audio", 14_614_322, lock="pattern") for g in ("primary", "backup")]
    state.publishers.insert(3, PublisherState("backup", "video", "region-b", "us-east", connected=True))
    state.publishers += [PublisherState(g, "audio", name, region, connected=True, fragments_pushed=61)
                         for g in ("primary", "backup") for name, region in (("region-a", "eu-west"),
                                                                            ("region-b", "us-east"))]  # fmt: skip
    return state


def text_of(renderable, width: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


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


def test_a_fragment_index_has_its_shared_clock_time() -> None:
    state = LiveState(epoch_ns=1_767_225_600 * 10**9, fragment_duration_exact=Fraction(2))
    assert index_time(state, 0) == "2026-01-01T00:00:00.000Z"
    assert index_time(state, 14_614_322) == "2026-12-05T07:04:04.000Z"  # 29,228,644 s after the epoch
    state.fragment_duration_exact = Fraction(1001, 500)  # 2.002 s: exact, no float
    assert index_time(state, 3) == "2026-01-01T00:00:06.006Z"
    assert index_time(state, None) is None
    assert index_time(LiveState(), 5) is None  # no clock known (a bare LiveState)
    assert document()["streams"][0]["last_index_time"] == "2026-01-01T00:01:24.000Z"  # index 42 x 2 s


def test_table_cells() -> None:
    state = live()
    error = "exited: ffmpeg exited with code 1"
    state.groups[0] = GroupState("primary", up=False, restarts=3, last_exit_code=1, last_error=error,
                                 last_error_wall=NOW_WALL - 1)  # fmt: skip
    state.publishers[1].dropped = 4
    text = text_of(table(document(state)), 220)
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    assert cells == [
        ["video", "42", "00:01:24", "primary encoder down", "region-a", "eu-west", "streaming", "3 (exit 1)", "4",
         "07:59:59 (1s ago) encoder: exited: ffmpeg exited with code 1"],
        ["", "", "", "", "region-b", "us-east", "reconnecting since 07:59:30 (30s), backlog 28 s", "", "", ""],
        ["", "", "", "backup", "region-a", "eu-west", "streaming", "0", "0", ""],
    ]  # fmt: skip
    assert "not ready: group primary: encoder down" in text
    assert "orchestrator: demo  08:00:00 UTC" in text


def test_an_80_column_terminal_gets_the_compact_layout_every_endpoint_told_apart() -> None:
    footer = "warnings and errors print above; INFO too: --log-file FILE or --status log"
    text = text_of(view(document(demo_like()), 80, footer=footer), 80)
    assert text.splitlines() == [
        "orchestrator: demo  08:00:00 UTC  ready",
        "stream     index  clock     group    endpoint  region   state              drops",
        "────────────────────────────────────────────────────────────────────────────────",
        "video   14614322  07:04:04  primary  region-a  eu-west  streaming              0",
        "                                     region-b  us-east  reconnecting 30s…      0",
        "                            backup   region-a  eu-west  streaming              0",
        "                                     region-b  us-east  streaming              0",
        "audio   14614322  07:04:04  primary  region-a  eu-west  streaming              0",
        "                                     region-b  us-east  streaming              0",
        "                            backup   region-a  eu-west  streaming              0",
        "                                     region-b  us-east  streaming              0",
        "primary: 2 restarts (last exit -9), lock=pattern",
        "primary: last error 07:59:58 (2s ago) region-b: connection failed: ConnectError",
        "backup: lock=pattern",
        footer,
    ]


def test_the_compact_layout_drops_the_region_before_cutting_a_name_and_cuts_long_lines() -> None:
    state = demo_like()
    state.groups[0].last_error = "exited: " + "x" * 200
    state.groups[0].last_error_wall = NOW_WALL
    lines_ = text_of(view(document(state), 64), 64).splitlines()
    assert max(len(line) for line in lines_) <= 64
    assert "region" not in lines_[1]  # the header: no region column at 64 columns
    assert [line.split()[-3] for line in lines_ if line.rstrip().endswith(" 0")] == ["region-a", "region-b"] * 4
    assert lines_[12].startswith("primary: last error 08:00:00 (0s ago) encoder: exited: xxx")
    assert lines_[12].endswith("…")


def test_a_wide_terminal_or_a_pipe_gets_the_full_table() -> None:
    text = text_of(view(document(demo_like()), 250, footer="the footer"), 250)
    assert "┃ stream ┃" in text
    assert "reconnecting since 07:59:30 (30s), backlog 28 s" in text
    assert "07:59:58 (2s ago) region-b: connection failed: ConnectError" in text


def test_the_stopping_and_stopped_frames_say_so_not_down() -> None:
    state = demo_like()
    for g in state.groups:
        g.up = False  # the encoders were stopped on purpose
    state.stopping = True
    stopping = text_of(view(document(state), 80), 80)
    assert stopping.splitlines()[0] == "orchestrator: demo  08:00:00 UTC  stopping: sending the last fragments"
    assert "down" not in stopping
    assert "not ready" not in stopping
    for p in state.publishers:
        p.connected = False
    stopped = text_of(view(document(state), 80, final=True), 80)
    assert stopped.splitlines()[0] == "orchestrator: demo  08:00:00 UTC  stopped"
    assert [line.split()[-2:] for line in stopped.splitlines()[3:11]] == [["stopped", "0"]] * 8
    assert "down" not in stopped
    assert "not ready" not in stopped
    wide = text_of(view(document(state), 250, final=True), 250)
    assert "encoder down" not in wide
    assert wide.count("│ stopped ") == 8


def test_the_summary_says_what_was_pushed_where_and_where_the_archive_is() -> None:
    state = demo_like()
    state.started_wall = NOW_WALL - 125
    state.archives = ["demo-archive/127.0.0.1-18081", "demo-archive/127.0.0.1-18082"]
    state.state_dir = "demo-state"
    assert summary(document(state), state) == [
        "stopped at 08:00:00 UTC after 2m; fragments pushed:",
        "  primary -> region-a (eu-west): video 0, audio 61",
        "  primary -> region-b (us-east): video 0, audio 61",
        "  backup -> region-a (eu-west): video 0, audio 61",
        "  backup -> region-b (us-east): video 0, audio 61",
        "archive (one fragmented MP4 per track):",
        "  demo-archive/127.0.0.1-18081",
        "  demo-archive/127.0.0.1-18082",
        "state, where the next up continues the timeline: demo-state",
    ]


def test_the_footer_is_true_to_the_logging_flags(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers[:] = [ConsoleLogHandler(sys.stderr)]
        root.setLevel(logging.INFO)
        assert footer_text() == "warnings and errors print above; INFO too: --log-file FILE or --status log"
        to_file = logging.FileHandler(tmp_path / "up.log")
        root.addHandler(to_file)
        assert footer_text() == f"warnings and errors print above; the whole log is in {tmp_path / 'up.log'}"
        root.setLevel(logging.WARNING)  # --log-level warning: there is no INFO anywhere
        assert footer_text() == "warnings and errors print above"
        to_file.close()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


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
