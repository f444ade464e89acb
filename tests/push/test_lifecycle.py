"""The publisher's request lifecycle, step by step without a network (in the manner of h11's
test_state.py): exact actions for exact events at exact times."""

from __future__ import annotations

import pytest

from orchestrator.errors import EndpointError, EndpointNotFound, EndpointRejected, EndpointUnauthorized
from orchestrator.push.lifecycle import (
    ABANDON,
    BACKED_OFF,
    DONE,
    DRAINED,
    EMPTY,
    HEADER_CHANGED,
    HEADER_SENT,
    NEXT,
    OPEN,
    OPEN_AFTER_FAILURE,
    OPENED,
    PROBE,
    READY,
    SEND_FRAGMENT,
    SEND_HEAD_AND_HEADER,
    SEND_HEAD_ONLY,
    SMOOTH,
    TIMED_OUT,
    WAIT_FOR_WORK,
    WORK,
    WRITTEN_NEW,
    WRITTEN_RESEND,
    Answered,
    BackOff,
    Completed,
    Failed,
    Finish,
    Lifecycle,
    LifecycleError,
    PublisherSettings,
    Rewind,
    Rewound,
    State,
    Wait,
)
from orchestrator.push.reconnect import Failure, RetryPolicy
from orchestrator.wire.format import RequestPlan

SEGMENT_PATH = "/{stream}/{track}/{index}"
STREAM_PATH = "/Streams({stream})"

URL = "http://ingest.example/live/x.isml/Streams(video)"
SETTINGS = PublisherSettings(send_timeout=3.0, response_timeout=10.0, idle_timeout=6.0,
                             retry=RetryPolicy(base=0.5, cap=8.0, slow=15.0, jitter=0.25))  # fmt: skip


def machine(plan: RequestPlan = SMOOTH) -> Lifecycle:
    return Lifecycle(URL, SETTINGS, plan, jitter=lambda: 0.5)  # jitter 0.5: the nominal delay


def walk(m: Lifecycle, steps: list[tuple[object, float, object]]) -> None:
    """Each step: (event, now, the action expected)."""
    for i, (event, now, expected) in enumerate(steps):
        assert m.handle(event, now) == expected, f"step {i}: {event!r} at {now}"


def open_post(m: Lifecycle, now: float = 0.0, reconnect: bool = False) -> None:
    opening = OPEN_AFTER_FAILURE if reconnect else OPEN
    walk(m, [(WORK, now, PROBE), (Answered(200, "OK"), now, opening), (OPENED, now, SEND_HEAD_AND_HEADER),
             (HEADER_SENT, now, NEXT)])  # fmt: skip


def test_a_smooth_post_probe_header_fragments_then_end_of_stream():
    m = machine()
    assert m.state is State.IDLE
    walk(m, [
        (WORK, 0.0, PROBE),
        (Answered(200, "OK"), 0.1, OPEN),
        (OPENED, 0.2, SEND_HEAD_AND_HEADER),
        (HEADER_SENT, 0.2, NEXT),
        (READY, 0.3, SEND_FRAGMENT),
        (WRITTEN_NEW, 0.4, NEXT),
        (EMPTY, 0.4, Wait(until=0.3 + 6.0)),  # idle counts from the last fragment taken
        (READY, 2.0, SEND_FRAGMENT),
        (WRITTEN_NEW, 2.1, NEXT),
        (DRAINED, 2.1, Finish("end_of_stream", 10.0)),
    ])  # fmt: skip
    assert m.state is State.FINISHING
    walk(m, [(Answered(200, "OK"), 2.2, Completed(200)), (DRAINED, 2.2, DONE)])
    assert m.state is State.DONE
    assert m.new_in_request == 2


def test_a_post_with_nothing_to_send_for_the_idle_timeout_is_finished_and_the_next_one_probes_again():
    m = machine()
    open_post(m)
    walk(m, [
        (EMPTY, 0.0, Wait(until=6.0)),
        (EMPTY, 5.999, Wait(until=6.0)),  # woken early (something else changed): keep waiting
        (EMPTY, 6.0, Finish("idle", 10.0)),
        (Answered(200, "OK"), 6.1, Completed(200)),
        (WORK, 9.0, PROBE),  # not a failure: no reconnect, and a new session (probe, header)
        (Answered(200, "OK"), 9.0, OPEN),
    ])  # fmt: skip
    assert m.consecutive_failures == 0


def test_a_header_change_finishes_the_post():
    m = machine()
    open_post(m)
    walk(m, [(HEADER_CHANGED, 1.0, Finish("header_changed", 10.0)), (Answered(200), 1.0, Completed(200))])


@pytest.mark.parametrize(("status", "error", "failure"), [
    (401, EndpointUnauthorized, Failure.UNAUTHORIZED),
    (403, EndpointUnauthorized, Failure.UNAUTHORIZED),
    (404, EndpointNotFound, Failure.NOT_FOUND),
    (503, EndpointRejected, Failure.SERVER),
    (302, EndpointRejected, Failure.REJECTED),
])  # fmt: skip
def test_a_refused_probe_is_a_named_failure_then_rewind_and_back_off(status, error, failure):
    m = machine()
    assert m.handle(WORK, 0.0) is PROBE
    action = m.handle(Answered(status, "No"), 1.0)
    assert isinstance(action, Rewind)
    assert (type(action.error), action.failure, action.attempt, action.error.status_code) == (
        error, failure, 1, status)  # fmt: skip
    assert m.state is State.REWINDING
    delay = 15.0 if failure in (Failure.UNAUTHORIZED, Failure.NOT_FOUND) else 0.0  # a person must fix those
    assert m.handle(Rewound(stopping=False), 1.0) == BackOff(until=1.0 + delay, delay=delay, attempt=1)
    assert m.handle(BACKED_OFF, 1.0 + delay) is WAIT_FOR_WORK
    assert m.state is State.IDLE


def test_backoff_grows_while_nothing_gets_through_and_the_next_post_counts_as_a_reconnect():
    m = machine()
    refused = Failed(EndpointError(URL, "connection failed: ConnectionRefusedError"))
    now, delays = 0.0, []
    for _ in range(7):
        assert m.handle(WORK, now) is PROBE
        assert m.handle(refused, now) == Rewind(Failure.TRANSPORT, refused.error, m.consecutive_failures)
        backoff = m.handle(Rewound(stopping=False), now)
        assert isinstance(backoff, BackOff)
        delays.append(backoff.delay)
        now = backoff.until
        assert m.handle(BACKED_OFF, now) is WAIT_FOR_WORK
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]  # first retry at once, then doubling to the cap
    walk(m, [(WORK, now, PROBE), (Answered(200), now, OPEN_AFTER_FAILURE), (OPENED, now, SEND_HEAD_AND_HEADER)])
    # Once a POST ends well, the count starts again.
    walk(m, [(HEADER_SENT, now, NEXT), (DRAINED, now, Finish("end_of_stream", 10.0)), (Answered(200), now,
             Completed(200))])  # fmt: skip
    assert m.consecutive_failures == 0


def test_a_broken_post_that_carried_new_fragments_is_retried_at_once_even_after_failures():
    m = machine()
    for now in (0.0, 0.0):  # two refused probes: the next delay would be 0.5 s
        walk(m, [(WORK, now, PROBE)])
        m.handle(Answered(503), now)
        m.handle(Rewound(stopping=False), now)
        m.handle(BACKED_OFF, now)
    assert m.consecutive_failures == 2
    open_post(m, 1.0, reconnect=True)
    walk(m, [(READY, 1.0, SEND_FRAGMENT), (WRITTEN_NEW, 1.1, NEXT)])
    reset = Failed(EndpointError(URL, "connection failed: ConnectionResetError"))
    assert m.handle(reset, 1.2) == Rewind(Failure.TRANSPORT, reset.error, 1)
    assert m.handle(Rewound(stopping=False), 1.2) == BackOff(1.2, 0.0, 1)


def test_a_post_that_only_resent_is_not_a_working_connection():
    m = machine()
    m.handle(WORK, 0.0)
    m.handle(Failed(EndpointError(URL, "refused")), 0.0)
    m.handle(Rewound(stopping=False), 0.0)
    m.handle(BACKED_OFF, 0.0)
    open_post(m, 0.0, reconnect=True)
    walk(m, [(READY, 0.0, SEND_FRAGMENT), (WRITTEN_RESEND, 0.1, NEXT)])
    assert m.handle(Failed(EndpointError(URL, "reset")), 0.2).attempt == 2


def test_an_answer_during_the_body_ends_the_post_with_its_status():
    m = machine()
    open_post(m)
    walk(m, [(READY, 0.0, SEND_FRAGMENT), (WRITTEN_NEW, 0.1, NEXT), (EMPTY, 0.1, Wait(6.0))])
    action = m.handle(Answered(503, "Service Unavailable"), 0.5)  # woken by the reader: no waiting for a fragment
    assert isinstance(action, Rewind)
    assert (action.failure, action.error.status_code, str(action.error)) == (
        Failure.SERVER, 503, f"{URL}: HTTP 503 Service Unavailable")  # fmt: skip


def test_a_2xx_before_the_body_ended_is_a_refusal_too():
    m = machine()
    open_post(m)
    action = m.handle(Answered(200, "OK"), 0.5)
    assert isinstance(action, Rewind)
    assert action.failure is Failure.REJECTED
    assert "answered HTTP 200 before the body ended" in str(action.error)


@pytest.mark.parametrize("state", ["probing", "finishing"])
def test_no_answer_within_the_response_timeout_is_a_transport_failure(state):
    m = machine()
    m.handle(WORK, 0.0)
    if state == "finishing":
        walk(m, [(Answered(200), 0.0, OPEN), (OPENED, 0.0, SEND_HEAD_AND_HEADER), (HEADER_SENT, 0.0, NEXT),
                 (DRAINED, 0.0, Finish("end_of_stream", 10.0))])  # fmt: skip
    action = m.handle(TIMED_OUT, 10.0)
    assert isinstance(action, Rewind)
    assert (action.failure, str(action.error)) == (Failure.TRANSPORT, f"{URL}: timed out (response, 10 s)")


def test_stopping_while_the_endpoint_is_down_abandons_after_three_failures():
    m = machine()
    for attempt in (1, 2, 3):
        m.handle(WORK, 0.0)
        assert m.handle(Failed(EndpointError(URL, "refused")), 0.0).attempt == attempt
        action = m.handle(Rewound(stopping=True), 0.0)
        if attempt < 3:
            assert isinstance(action, BackOff)
            m.handle(BACKED_OFF, action.until)
    assert action is ABANDON
    assert m.state is State.DONE


def test_events_out_of_order_are_a_bug_in_the_shell():
    m = machine()
    with pytest.raises(LifecycleError, match="Ready is not expected in state idle"):
        m.handle(READY, 0.0)
    m.handle(WORK, 0.0)
    with pytest.raises(LifecycleError):
        m.handle(WRITTEN_NEW, 0.0)


def test_a_per_segment_plan_sends_one_fragment_per_request_without_probing_between():
    m = machine(RequestPlan(per="segment", probe_first=True, header_on_every_request=False, path=SEGMENT_PATH))
    walk(m, [
        (WORK, 0.0, PROBE),
        (Answered(200), 0.0, OPEN),
        (OPENED, 0.0, SEND_HEAD_AND_HEADER),  # the session's first request carries the header
        (HEADER_SENT, 0.0, NEXT),
        (READY, 0.0, SEND_FRAGMENT),
        (WRITTEN_NEW, 0.1, Finish("segment", 10.0)),
        (Answered(201, "Created"), 0.2, Completed(201)),
        (WORK, 2.0, OPEN),  # same session: no probe
        (OPENED, 2.0, SEND_HEAD_ONLY),  # and no header
        (HEADER_SENT, 2.0, NEXT),
        (READY, 2.0, SEND_FRAGMENT),
        (WRITTEN_NEW, 2.1, Finish("segment", 10.0)),
    ])  # fmt: skip
    assert isinstance(m.handle(Answered(500), 2.2), Rewind)  # a failure ends the session
    walk(m, [(Rewound(stopping=False), 2.2, BackOff(2.2, 0.0, 1)), (BACKED_OFF, 2.2, WAIT_FOR_WORK),
             (WORK, 2.2, PROBE), (Answered(200), 2.2, OPEN_AFTER_FAILURE),
             (OPENED, 2.3, SEND_HEAD_AND_HEADER)])  # fmt: skip


def test_a_plan_is_per_stream_or_per_segment():
    with pytest.raises(ValueError, match="per stream or per segment"):
        RequestPlan(per="frame", probe_first=True, header_on_every_request=True, path=STREAM_PATH)  # type: ignore[arg-type]
    assert (
        RequestPlan(per="segment", probe_first=False, header_on_every_request=True, path=SEGMENT_PATH).probe_first
        is False
    )
    m = machine(RequestPlan(per="stream", probe_first=False, header_on_every_request=True, path=STREAM_PATH))
    assert m.handle(WORK, 0.0) is OPEN
