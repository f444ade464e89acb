"""The content lock in /status and the operator's view: per stream and group, how the content is
locked (pattern, file, or a live lock's origin) and the content offset of the stream's first track."""

from __future__ import annotations

from rich.console import Console

from orchestrator.ops.state import EncoderState, GroupState, LiveState, PublisherState
from orchestrator.ops.status import status_document
from orchestrator.ops.view import lines, table


def state() -> LiveState:
    live = LiveState(presentation="demo", fragment_duration=2.0)
    live.groups += [GroupState("primary", up=True), GroupState("backup", up=True), GroupState("spare", up=True)]
    live.encoders += [EncoderState("primary", "av", 41, lock="file", content_offset=0.0),
                      EncoderState("backup", "av", 41, lock="file", content_offset=2.0),
                      EncoderState("spare", "av", 40)]  # fmt: skip
    live.publishers += [PublisherState(g, "av", "a", "eu-west", connected=True) for g in ("primary", "backup", "spare")]
    return live


def test_status_and_view_show_each_groups_lock_and_content_offset() -> None:
    document = status_document(state(), now_wall=1_800_000_000.0, now_monotonic=100.0)
    groups = document["streams"][0]["groups"]
    assert [(g["group"], g["lock"], g["content_offset_seconds"]) for g in groups] == [
        ("primary", "file", 0.0), ("backup", "file", 2.0), ("spare", None, None)]  # fmt: skip
    assert [line.split(" restarts")[0].split("encoder=up ")[1] for line in lines(document)] == [
        "a/eu-west=streaming lock=file,offset=+0.000s",
        "a/eu-west=streaming lock=file,offset=+2.000s",  # a fragment off the other group: the alert fires
        "a/eu-west=streaming",
    ]
    console = Console(width=200, record=True, color_system=None)
    console.print(table(document))
    text = console.export_text()
    assert "primary lock=file,offset=+0.000s" in text
    assert "backup lock=file,offset=+2.000s" in text
