"""The open-files limit: raised to what the profile needs, up to the hard limit; a hard limit
too low is an error naming the numbers."""

from __future__ import annotations

import logging
import resource

import pytest

from orchestrator.ops.openfiles import MARGIN, ensure_open_files, files_needed


@pytest.fixture
def lowered_soft_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 512
    if hard != resource.RLIM_INFINITY and hard < low + 100:
        pytest.skip(f"hard open-files limit {hard} is too low to test raising")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    yield low, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_files_needed_counts_two_per_publisher_and_a_margin():
    assert files_needed(4000, 2) == 8000 + MARGIN


def test_soft_limit_is_raised_to_what_is_needed(lowered_soft_limit, caplog):
    caplog.set_level(logging.INFO)
    low, hard = lowered_soft_limit
    outcome = ensure_open_files(low + 100)
    assert outcome is not None
    assert (outcome.soft_before, outcome.soft, outcome.sufficient) == (low, low + 100, True)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (low + 100, hard)
    assert f"soft={low}->{low + 100}" in caplog.text


def test_enough_already_changes_nothing(lowered_soft_limit):
    low, _ = lowered_soft_limit
    outcome = ensure_open_files(low - 10)
    assert outcome is not None
    assert (outcome.soft, outcome.sufficient) == (low, True)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == low


def test_hard_limit_too_low_is_named(lowered_soft_limit, caplog):
    _, hard = lowered_soft_limit
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-files limit here")
    outcome = ensure_open_files(hard + 1000)
    assert outcome is not None
    assert (outcome.soft, outcome.sufficient) == (hard, False)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    record = next(r for r in caplog.records if "open_files.too_low" in r.getMessage())
    assert record.levelno == logging.ERROR
    assert f"needed={hard + 1000}" in record.getMessage()
    assert f"hard={hard}" in record.getMessage()
