import pytest

from orchestrator.push.failures import classify_status
from orchestrator.push.reconnect import Failure, RetryPolicy


def test_first_retry_is_immediate_then_exponential_capped():
    policy = RetryPolicy(base=0.5, cap=8.0, jitter=0.0)
    delays = [policy.delay(n, Failure.TRANSPORT) for n in range(1, 9)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_jitter_stays_within_bounds():
    policy = RetryPolicy(base=1.0, cap=8.0, jitter=0.25)
    assert policy.delay(3, Failure.SERVER, 0.0) == pytest.approx(1.5)
    assert policy.delay(3, Failure.SERVER, 0.5) == pytest.approx(2.0)
    assert policy.delay(3, Failure.SERVER, 0.999) == pytest.approx(2.499, abs=1e-3)


@pytest.mark.parametrize("failure", [Failure.UNAUTHORIZED, Failure.NOT_FOUND])
def test_operator_fixable_failures_retry_slowly_but_forever(failure):
    policy = RetryPolicy(slow=15.0, jitter=0.0)
    assert policy.delay(1, failure) == 15.0
    assert policy.delay(1000, failure) == 15.0


@pytest.mark.parametrize(
    ("status", "failure"),
    [(401, Failure.UNAUTHORIZED), (403, Failure.UNAUTHORIZED), (404, Failure.NOT_FOUND), (500, Failure.SERVER),
     (503, Failure.SERVER), (400, Failure.REJECTED), (409, Failure.REJECTED)],
)  # fmt: skip
def test_classify_status(status, failure):
    assert classify_status(status) is failure


def test_production_defaults():
    """What ``up`` runs with (PublisherSettings' default RetryPolicy): first retry immediate,
    then 0.5 s doubling to an 8 s cap, 15 s for failures a person must fix, jitter +/- 25 %."""
    policy = RetryPolicy()
    assert (policy.base, policy.cap, policy.slow, policy.jitter) == (0.5, 8.0, 15.0, 0.25)
    assert [policy.delay(n, Failure.TRANSPORT) for n in range(1, 8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert policy.delay(2, Failure.SERVER, 0.0) == 0.375
    assert policy.delay(6, Failure.SERVER, 1.0) == 10.0
    assert policy.delay(1, Failure.UNAUTHORIZED, 0.0) == 11.25
