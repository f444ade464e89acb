"""The /status document, readiness and "down", from plain state (no I/O)."""

from __future__ import annotations

from opsrig import NOW_MONO, NOW_WALL, live

from orchestrator.ops.state import GroupState, LiveState, PublisherState
from orchestrator.ops.status import down, endpoint_state, not_ready, status_document


def test_endpoint_states() -> None:
    p = PublisherState("primary", "video", "a")
    assert endpoint_state(p) == "waiting"
    p.record_failure("transport", "reset", 1.0)
    assert endpoint_state(p) == "reconnecting"
    p.record_failure("unauthorized", "HTTP 401", 2.0)
    assert endpoint_state(p) == "unauthorised"
    p.record_failure("not_found", "HTTP 404", 3.0)
    assert endpoint_state(p) == "not_found"
    p.set_connected(True, 4.0)
    assert (endpoint_state(p), p.problem, p.since_wall, p.last_error) == ("streaming", None, 4.0, "HTTP 404")
    p.set_connected(False, 5.0)  # an idle POST ended cleanly: no failure
    assert (endpoint_state(p), p.since_wall) == ("waiting", 5.0)
    p.set_connected(False, 6.0)
    assert p.since_wall == 5.0  # "since" moves only on a change


def test_push_and_group_state() -> None:
    p = PublisherState("primary", "video", "a")
    p.record_push(7, False, 10.0)
    p.record_push(6, True, 11.0)
    assert (p.last_index, p.last_push_monotonic, p.fragments_pushed, p.resent) == (6, 11.0, 2, 1)
    g = GroupState("primary")
    g.set_up(True, 1.0)
    g.record_failure("exited: code 1", 1, 2.0)
    g.record_failure("stalled", None, 3.0)
    g.set_up(False, 3.0)
    assert (g.up, g.since_wall, g.last_exit_code, g.last_error, g.last_error_wall) == (False, 3.0, 1, "stalled", 3.0)


def test_document() -> None:
    doc = status_document(live(), now_wall=NOW_WALL, now_monotonic=NOW_MONO)
    assert doc["presentation"] == "demo"
    assert doc["time"] == NOW_WALL
    assert doc["groups"]["primary"] == {
        "encoder_up": True, "since": None, "restarts": 2, "last_exit_code": -9, "last_error": None,
        "last_error_at": None}  # fmt: skip
    assert [s["stream"] for s in doc["streams"]] == ["video"]
    video = doc["streams"][0]
    assert video["last_index"] == 42
    assert [(g["group"], g["last_index"]) for g in video["groups"]] == [("primary", 41), ("backup", 42)]
    a, b = video["groups"][0]["endpoints"]
    assert a["last_push_at"] == NOW_WALL - 1.5
    assert b == {
        "endpoint": "region-b", "region": "us-east", "state": "reconnecting", "connected": False,
        "since": NOW_WALL - 30, "last_index": None, "last_push_at": None,
        "last_error": "connection failed: ConnectError", "last_error_at": NOW_WALL - 2, "failures": 1,
        "reconnects": 0, "retry_in_seconds": 0.0, "backlog_fragments": 30, "backlog_bytes": 123_456,
        "backlog_seconds": 28.0, "dropped": 0, "resent": 0, "pushed": 0}  # fmt: skip
    # Every (group, stream) has an endpoint streaming and every encoder is up: ready; but one
    # endpoint is down.
    assert doc["ready"] is True
    assert doc["not_ready"] == []
    assert down(doc) == ["stream video group primary endpoint region-b (us-east): reconnecting"]


def test_not_ready_reasons() -> None:
    state = live()
    state.groups[0].up = False
    state.publishers[2].connected = False
    doc = status_document(state, now_wall=NOW_WALL, now_monotonic=NOW_MONO)
    assert doc["ready"] is False
    assert doc["not_ready"] == ["group primary: encoder down", "stream video group backup: no endpoint streaming"]
    assert not_ready(doc) == doc["not_ready"]
    assert down(doc) == [
        "group primary: encoder down",
        "stream video group primary endpoint region-b (us-east): reconnecting",
        "stream video group backup endpoint region-a (eu-west): waiting",
    ]
    assert not_ready(status_document(LiveState(), now_wall=0, now_monotonic=0)) == ["no encoder group is running yet"]
