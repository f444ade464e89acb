"""The ``/status`` document, readiness, and what counts as "down": pure functions of the live state.

Theory of operation
-------------------
:func:`status_document` turns a :class:`~orchestrator.ops.state.LiveState` into plain JSON data,
per stream, group and endpoint. Times in it are Unix seconds, and the document carries its own
``time``, so a reader in another process (``orchestrator status``) computes ages against the
clock of the process that wrote it, not its own. Both the terminal view of ``up`` and
``orchestrator status`` render this document (:mod:`orchestrator.ops.view`), so they always show
the same thing.

:func:`not_ready` is the ``/readyz`` rule: every encoder instance of this process is up, and
every (group, stream) of this process has at least one endpoint streaming. :func:`down` is
stricter, for scripts and the operator: any encoder down, any endpoint not streaming.

An endpoint's ``state`` is one of ``streaming`` (a POST is carrying fragments), ``waiting`` (no
failure: the first POST is not open yet, or the last one ended idle while the encoder restarts),
``reconnecting`` (the last attempt failed; retrying), ``unauthorised`` (401/403: credentials) or
``not_found`` (404: the publishing point).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from orchestrator.ops.state import LiveState, PublisherState

STATES = ("streaming", "waiting", "reconnecting", "unauthorised", "not_found")


def endpoint_state(p: PublisherState) -> str:
    if p.connected:
        return "streaming"
    if p.problem == "unauthorized":
        return "unauthorised"
    if p.problem == "not_found":
        return "not_found"
    return "reconnecting" if p.problem is not None else "waiting"


def status_document(live: LiveState, *, now_wall: float, now_monotonic: float) -> dict[str, Any]:
    """The ``/status`` JSON document (see docs/status-and-health.md, "Health and status endpoints")."""

    def wall(monotonic: float | None) -> float | None:
        return None if monotonic is None else round(now_wall - (now_monotonic - monotonic), 3)

    stream_ids = list(dict.fromkeys([e.stream_id for e in live.encoders] + [p.stream_id for p in live.publishers]))
    group_names = list(dict.fromkeys([g.group for g in live.groups] + [e.group for e in live.encoders]))
    groups = {
        g.group: {
            "encoder_up": g.up,
            "since": g.since_wall,
            "restarts": g.restarts,
            "last_exit_code": g.last_exit_code,
            "last_error": g.last_error,
            "last_error_at": g.last_error_wall,
        }
        for g in live.groups
    }
    streams = []
    for stream_id in stream_ids:
        encoded = [e.last_index for e in live.encoders if e.stream_id == stream_id and e.last_index is not None]
        per_group = []
        for group in group_names:
            encoder = next((e for e in live.encoders if e.group == group and e.stream_id == stream_id), None)
            endpoints = [
                {
                    "endpoint": p.endpoint,
                    "region": p.region,
                    "state": endpoint_state(p),
                    "connected": p.connected,
                    "since": p.since_wall,
                    "last_index": p.last_index,
                    "last_push_at": wall(p.last_push_monotonic),
                    "last_error": p.last_error,
                    "last_error_at": p.last_error_wall,
                    "failures": p.failures,
                    "reconnects": p.reconnects,
                    "retry_in_seconds": p.retry_delay,
                    "backlog_fragments": p.backlog_fragments,
                    "backlog_bytes": p.backlog_bytes,
                    "backlog_seconds": p.backlog_seconds,
                    "dropped": p.dropped,
                    "resent": p.resent,
                    "pushed": p.fragments_pushed,
                }
                for p in live.publishers
                if p.group == group and p.stream_id == stream_id
            ]
            if encoder is None and not endpoints:
                continue
            per_group.append({
                "group": group,
                "last_index": encoder.last_index if encoder else None,
                "lock": encoder.lock if encoder else None,
                "content_offset_seconds": encoder.content_offset if encoder else None,
                "peers": [{"peer": a.peer, "agreement": a.state, "offset_ticks": a.ticks}
                          for a in (encoder.peers if encoder else ())],
                "endpoints": endpoints,
            })  # fmt: skip
        last_index = max(encoded) if encoded else None
        streams.append({"stream": stream_id, "last_index": last_index, "last_index_time": index_time(live, last_index),
                        "groups": per_group})  # fmt: skip
    document: dict[str, Any] = {
        "presentation": live.presentation,
        "fragment_duration": live.fragment_duration,
        "time": round(now_wall, 3),
        "stopping": live.stopping,
        "groups": groups,
        "streams": streams,
    }
    reasons = not_ready(document)
    document["ready"] = not reasons
    document["not_ready"] = reasons
    return document


def index_time(live: LiveState, index: int | None) -> str | None:
    """The shared-clock (UTC wall) time at which fragment ``index`` starts, as RFC 3339 with
    milliseconds: ``epoch + index x fragment duration``, in integer nanoseconds."""
    if index is None or live.epoch_ns is None or live.fragment_duration_exact is None:
        return None
    duration = live.fragment_duration_exact
    start_ns = live.epoch_ns + index * duration.numerator * 10**9 // duration.denominator
    seconds, ns = divmod(start_ns, 10**9)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns // 10**6:03d}Z"


def not_ready(document: dict[str, Any]) -> list[str]:
    """Why this process is not ready (empty: ready): an encoder instance down, or a (group,
    stream) with no endpoint streaming. A process with no group at all is not ready either."""
    reasons = []
    if not document["groups"]:
        reasons.append("no encoder group is running yet")
    for group, g in document["groups"].items():
        if not g["encoder_up"]:
            reasons.append(f"group {group}: encoder down")
    for stream in document["streams"]:
        for group in stream["groups"]:
            if not any(e["state"] == "streaming" for e in group["endpoints"]):
                reasons.append(f"stream {stream['stream']} group {group['group']}: no endpoint streaming")
    return reasons


def down(document: dict[str, Any]) -> list[str]:
    """Everything that is not working: each encoder down and each endpoint not streaming."""
    problems = [f"group {group}: encoder down" for group, g in document["groups"].items() if not g["encoder_up"]]
    for stream in document["streams"]:
        for group in stream["groups"]:
            for e in group["endpoints"]:
                if e["state"] != "streaming":
                    problems.append(f"stream {stream['stream']} group {group['group']} endpoint {e['endpoint']} "
                                    f"({e['region']}): {e['state']}")  # fmt: skip
    return problems
