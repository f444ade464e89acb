"""The series the alert rules are built on (orchestrator.ops.metrics): present from the start, and
independent of the moment they are scraped."""

from __future__ import annotations

import time

import trio

from orchestrator.ops.metrics import Metrics
from orchestrator.ops.state import LiveState, PublisherState

LABELS = ("video", "primary", "ingest-a", "region-a")
SERIES = {"presentation": "event", "stream": "video", "group": "primary", "endpoint": "ingest-a",
          "endpoint_region": "region-a"}  # fmt: skip


def described(running: list[str]) -> Metrics:
    metrics = Metrics()
    metrics.describe_profile("event", ["primary", "backup"], running, epoch_seconds=0.0, fragment_duration=2.0)
    return metrics


def test_a_publisher_that_never_pushed_shows_its_age_since_start() -> None:
    """An off-air alert needs a series to compare: a process whose endpoints all answer 404 from
    the start must not leave the age missing."""
    metrics = described(["primary"])
    metrics.seconds_since_push.track(LABELS, lambda: None)  # the publisher: nothing pushed yet
    time.sleep(0.05)
    age = metrics.registry.get_sample_value("orchestrator_seconds_since_last_push", SERIES)
    assert age is not None
    assert 0.05 <= age < 5
    # Once it pushed, the publisher's own age is what is exported.
    metrics.seconds_since_push.track(LABELS, lambda: 0.25)
    assert metrics.registry.get_sample_value("orchestrator_seconds_since_last_push", SERIES) == 0.25


def test_every_group_of_the_profile_is_exported_with_the_ones_run_here() -> None:
    metrics = described(["backup"])
    value = metrics.registry.get_sample_value
    assert value("orchestrator_profile_group_info", {"presentation": "event", "group": "backup"}) == 1
    assert value("orchestrator_profile_group_info", {"presentation": "event", "group": "primary"}) == 0
    assert value("orchestrator_fragment_duration_seconds", {"presentation": "event"}) == 2.0


def test_endpoint_series_say_endpoint_region_not_region() -> None:
    """``region`` is the usual external label of a regional Prometheus; an endpoint's region
    under that name would be overwritten or clash once the series leave it."""
    metrics = described(["primary"])
    metrics.initialise_endpoint(LABELS)
    names = {label for family in metrics.registry.collect() for s in family.samples for label in s.labels}
    assert "endpoint_region" in names
    assert "region" not in names


async def test_push_lag_is_the_same_whenever_it_is_read() -> None:
    """The lag of the last push behind the shared clock, read at two moments (two scrape phases),
    is the same number: unlike a fragment index, it does not move between scrapes."""
    now_wall, now = time.time(), trio.current_time()
    epoch = now_wall - 23.5  # fragment 10 of 2 s ends at epoch + 22 s: pushed 1.5 s after its end
    live = LiveState(publishers=[PublisherState("primary", "video", "ingest-a", "region-a", last_index=10,
                                                last_push_monotonic=now)])  # fmt: skip
    metrics = Metrics()
    metrics.describe_profile("event", ["primary"], ["primary"], epoch_seconds=epoch, fragment_duration=2.0)
    metrics.push_lag.watch(live)
    first = metrics.registry.get_sample_value("orchestrator_push_lag_seconds", SERIES)
    await trio.sleep(0.3)
    second = metrics.registry.get_sample_value("orchestrator_push_lag_seconds", SERIES)
    assert first is not None
    assert abs(first - 1.5) < 0.05
    assert abs(second - first) < 0.01
    # Before a first push there is no lag to show.
    live.publishers[0].last_index = None
    assert metrics.registry.get_sample_value("orchestrator_push_lag_seconds", SERIES) is None


def test_wall_clock_is_read_at_scrape_time() -> None:
    metrics = Metrics()
    before = time.time()
    value = metrics.registry.get_sample_value("orchestrator_wall_clock_seconds")
    assert value is not None
    assert before <= value <= time.time()
