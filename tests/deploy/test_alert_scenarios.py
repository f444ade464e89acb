"""The alert rules against production-like scrapes (tests/deploy/scenarios.py), with the real
promtool: both groups scraped every 15 s at phases 0, 5, 9 and 14 s apart, targets that leave
service discovery, processes that never pushed, one ingest endpoint dark for every group, a
flapping endpoint, a group out of step, and each other alert firing and quiet.

Each scenario is one promtool test; the expectations are the complete alert sets (labels and
all) at the given times, and every alert of both rule files is also shown quiet in the healthy
scenarios.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from promkit import tool
from scenarios import (
    ALL_ALERTS,
    GROUP_RULES,
    SCENARIOS,
    STREAMS,
    Process,
    Scenario,
    promtool_file,
    warning,
)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario, tmp_path: Path) -> None:
    path = promtool_file([scenario], tmp_path)
    result = subprocess.run([tool("promtool"), "test", "rules", path.name], capture_output=True, text=True,
                            check=False, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_every_alert_fires_in_some_scenario_and_is_quiet_in_the_healthy_ones() -> None:
    fires = {alert for s in SCENARIOS for _, alert, expected in s.expect if expected}
    assert set(ALL_ALERTS) - fires == set(), "alerts never shown firing"
    healthy_checked = {alert for s in SCENARIOS if s.name.startswith("healthy") for _, alert, _ in s.expect}
    assert healthy_checked == set(ALL_ALERTS)


def critical_alerts(paths: list[Path]) -> list[str]:
    return [rule["alert"] for path in paths for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if rule.get("labels", {}).get("severity") == "critical"]  # fmt: skip


def regional_scenario(tmp_path: Path, files: list[Path], *, stalled_warning: bool) -> subprocess.CompletedProcess[str]:
    """promtool on ``files`` loaded as a regional Prometheus that scrapes only the primary (the
    backup runs, unseen, in another region), the primary stalling from 2 min: no critical alert
    of ``files`` may fire."""

    def dead_from_2m(t: float, stream: str, endpoint: str) -> bool:
        return t < 120

    primary = Process("primary", phase=7, pushing=dead_from_2m)
    expect = [(t, name, []) for t in (300, 600) for name in critical_alerts(files)]
    if stalled_warning:
        expect += [(300, "OrchestratorStreamStalled", [warning(primary, stream=s, group="primary") for s in STREAMS])]
    scenario = Scenario("regional Prometheus, its one group stalls", [primary], 660, expect)
    path = promtool_file([scenario], tmp_path, files)
    return subprocess.run([tool("promtool"), "test", "rules", path.name], capture_output=True, text=True,
                          check=False, cwd=tmp_path)  # fmt: skip


def test_a_regional_prometheus_that_sees_one_group_pages_nobody(tmp_path: Path) -> None:
    """The per-group rules are right where one group is seen: its stall is a warning, never a
    page, since that Prometheus cannot know whether the other group covers. (The rules as they
    were paged "stalled in every group" here.)"""
    result = regional_scenario(tmp_path, [GROUP_RULES], stalled_warning=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
