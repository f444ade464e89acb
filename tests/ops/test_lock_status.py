"""The content lock in /status and the operator's view: per stream and group, how the content is
locked (pattern, file, or a live lock's origin) and the content offset of the stream's first track."""

from __future__ import annotations

from rich.console import Console

from orchestrator.ops.state import EncoderState, GroupState, LiveState, PeerAgreement, PublisherState
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


def test_status_and_view_show_whether_a_live_lock_agrees_with_each_peer() -> None:
    live = LiveState(presentation="demo", fragment_duration=2.0)
    live.groups += [GroupState("primary", up=True), GroupState("backup", up=True)]
    peers = (PeerAgreement("backup", "differs", -18_000), PeerAgreement("spare", "agrees"),
             PeerAgreement("old", "other_timeline", 2_700_000),
             PeerAgreement("http://backup-host:9464/metrics", "unreachable"),
             PeerAgreement("http://spare-host:9464/metrics", "no_mapping"))  # fmt: skip
    live.encoders += [EncoderState("primary", "av", 41, lock="established", content_offset=95.5, peers=peers),
                      EncoderState("backup", "av", 41, lock="peer", content_offset=95.3,
                                   peers=(PeerAgreement("primary", "agrees"),))]  # fmt: skip
    live.publishers += [PublisherState(g, "av", "a", "eu-west", connected=True) for g in ("primary", "backup")]
    document = status_document(live, now_wall=1_800_000_000.0, now_monotonic=100.0)
    primary, backup = document["streams"][0]["groups"]
    assert primary["peers"] == [
        {"peer": "backup", "agreement": "differs", "offset_ticks": -18_000},
        {"peer": "spare", "agreement": "agrees", "offset_ticks": None},
        {"peer": "old", "agreement": "other_timeline", "offset_ticks": 2_700_000},
        {"peer": "http://backup-host:9464/metrics", "agreement": "unreachable", "offset_ticks": None},
        {"peer": "http://spare-host:9464/metrics", "agreement": "no_mapping", "offset_ticks": None},
    ]
    assert backup["peers"] == [{"peer": "primary", "agreement": "agrees", "offset_ticks": None}]
    assert [line.split(" restarts")[0].split("=streaming ")[1] for line in lines(document)] == [
        "lock=established,offset=+95.500s,backup=-18000t,spare=ok,old=other,backup-host:9464=down,spare-host:9464=none",
        "lock=peer,offset=+95.300s,primary=ok",
    ]
    console = Console(width=250, record=True, color_system=None)
    console.print(table(document))
    assert "backup lock=peer,offset=+95.300s,primary=ok" in console.export_text()
    # a file or pattern group has no peers: nothing more than before
    assert status_document(state(), now_wall=1.0, now_monotonic=1.0)["streams"][0]["groups"][0]["peers"] == []
