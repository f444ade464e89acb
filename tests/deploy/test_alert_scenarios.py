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
    CROSS_RULES,
    ENDPOINTS,
    GROUP_RULES,
    GROUPS,
    PRESENTATION,
    STREAMS,
    Process,
    Scenario,
    promtool_file,
)

ALL_ALERTS = sorted(
    rule["alert"]
    for path in (GROUP_RULES, CROSS_RULES)
    for group in yaml.safe_load(path.read_text())["groups"]
    for rule in group["rules"]
)
REGION = dict(ENDPOINTS)


def never(t: float, stream: str, endpoint: str) -> bool:
    return False


def critical(**labels: str) -> dict[str, str]:
    return {"severity": "critical", "presentation": PRESENTATION, **labels}


def warning(process: Process | None = None, **labels: str) -> dict[str, str]:
    target = process.target() if process is not None else {}
    return {"severity": "warning", "presentation": PRESENTATION, **target, **labels}


def off_air(stream: str, endpoint: str) -> dict[str, str]:
    return critical(stream=stream, endpoint=endpoint, endpoint_region=REGION[endpoint])


def endpoint_labels(process: Process, stream: str, endpoint: str, **extra: str) -> dict[str, str]:
    return warning(process, stream=stream, group=process.group, endpoint=endpoint, endpoint_region=REGION[endpoint],
                   **extra)  # fmt: skip


def quiet_everywhere(*times: int) -> list[tuple[int, str, list[dict[str, str]]]]:
    return [(t, alert, []) for t in times for alert in ALL_ALERTS]


def healthy(offset: int) -> Scenario:
    # The backup pushes 1.2 s later than the primary (a slower host): in step all the same.
    pair = [Process("primary", phase=0, latency=0.4), Process("backup", phase=offset, latency=1.6)]
    return Scenario(f"healthy pair scraped {offset} s apart", pair, 900, quiet_everywhere(120, 300, 600, 885))


def scenarios() -> list[Scenario]:
    out = [healthy(offset) for offset in (0, 5, 9, 14)]

    primary, backup = Process("primary", phase=0), Process("backup", phase=9, gone_at=300)
    out.append(Scenario("the backup's pod leaves service discovery at 5 min", [primary, backup], 600, [
        (420, "OrchestratorGroupMissing", []),  # pending: gone since 315 s
        (450, "OrchestratorGroupMissing", [critical(group="backup")]),
        (450, "OrchestratorGroupGone", [warning(job="orchestrator", group="backup")]),
        (450, "OrchestratorStreamOffAir", []),
        (450, "OrchestratorDown", []),
        (450, "OrchestratorPresentationGone", []),
    ]))  # fmt: skip

    pair = [Process(g, phase=p, pushing=never, failure="not_found") for g, p in (("primary", 0), ("backup", 9))]
    out.append(Scenario("both groups restart and never push (every endpoint 404)", pair, 300, [
        (30, "OrchestratorStreamOffAir", []),  # pending
        (60, "OrchestratorStreamOffAir", [off_air(s, e) for s in STREAMS for e, _ in ENDPOINTS]),
        (60, "OrchestratorEndpointReceivingNothing",
         [critical(endpoint=e, endpoint_region=r) for e, r in ENDPOINTS]),
        (90, "OrchestratorStreamStalled",
         [warning(p, stream=s, group=p.group) for p in pair for s in STREAMS]),
        (90, "OrchestratorEndpointDown",
         [endpoint_labels(p, s, e, state="not_found") for p in pair for s in STREAMS for e, _ in ENDPOINTS]),
        (90, "OrchestratorRedundancyLost", []),
    ]))  # fmt: skip

    def not_a(t: float, stream: str, endpoint: str) -> bool:
        return t < 120 or endpoint != "ingest-a"

    pair = [Process("primary", phase=0, pushing=not_a), Process("backup", phase=14, pushing=not_a)]
    out.append(Scenario("ingest-a receives nothing from any group from 2 min; ingest-b is fine", pair, 600, [
        (300, "OrchestratorEndpointReceivingNothing", [critical(endpoint="ingest-a", endpoint_region="region-a")]),
        (300, "OrchestratorStreamOffAir", [off_air(s, "ingest-a") for s in STREAMS]),
        (300, "OrchestratorEndpointDown",
         [endpoint_labels(p, s, "ingest-a", state="reconnecting") for p in pair for s in STREAMS]),
        (585, "OrchestratorRedundancyLost", []),
        (585, "OrchestratorGroupMissing", []),
    ]))  # fmt: skip

    def dead_from_2m(t: float, stream: str, endpoint: str) -> bool:
        return t < 120

    primary, backup = Process("primary", phase=5, pushing=dead_from_2m), Process("backup", phase=0)
    out.append(Scenario("the primary stops delivering at 2 min; the backup covers", [primary, backup], 600, [
        (300, "OrchestratorStreamOffAir", []),
        (300, "OrchestratorRedundancyLost", []),  # pending for 5 min
        (300, "OrchestratorStreamStalled", [warning(primary, stream=s, group="primary") for s in STREAMS]),
        (450, "OrchestratorRedundancyLost",
         [critical(stream=s, group="primary", endpoint=e, endpoint_region=r) for s in STREAMS for e, r in ENDPOINTS]),
        (450, "OrchestratorStreamOffAir", []),
    ]))  # fmt: skip

    pair = [Process("primary", phase=0), Process("backup", phase=9, behind=3)]
    out.append(Scenario("the backup 3 fragments behind", pair, 600, [
        (300, "OrchestratorGroupsOutOfStep", []),
        (345, "OrchestratorGroupsOutOfStep", [warning(stream=s, group="backup") for s in STREAMS]),
    ]))  # fmt: skip

    primary, backup = Process("primary", phase=0), Process("backup", phase=9, down_at=300)
    out.append(Scenario("the backup's scrapes fail from 5 min", [primary, backup], 600, [
        (360, "OrchestratorDown", []),
        (390, "OrchestratorDown", [warning(backup, group="backup")]),
        (450, "OrchestratorGroupMissing", [critical(group="backup")]),
    ]))  # fmt: skip

    pair = [Process("primary", phase=3, gone_at=300), Process("backup", phase=11, gone_at=300)]
    out.append(Scenario("every process gone at 5 min, then 15 min later", pair, 1320, [
        (360, "OrchestratorPresentationGone", []),
        (390, "OrchestratorPresentationGone", [critical()]),
        (390, "OrchestratorGroupMissing", []),
        (1260, "OrchestratorPresentationGone", []),  # 15 min on: forgotten (README, "Ending an event")
    ]))  # fmt: skip

    primary = Process("primary", phase=0, reconnect_every=30)
    out.append(Scenario("ingest-b drops the primary's POST every 30 s", [primary, Process("backup", phase=9)], 400, [
        (90, "OrchestratorEndpointFlapping", []),  # three reconnects so far
        (150, "OrchestratorEndpointFlapping", [endpoint_labels(primary, s, "ingest-b") for s in STREAMS]),
    ]))  # fmt: skip

    backup = Process("backup", phase=9, skew=3.0)
    out.append(Scenario("the backup's clock 3 s ahead", [Process("primary"), backup], 600, [
        (285, "OrchestratorClockSkew", []),
        (330, "OrchestratorClockSkew", [warning(backup, group="backup")]),
    ]))  # fmt: skip

    both = [Process(g, phase=4, skew=3.0, down_at=420, instance="both:9464", runs=GROUPS) for g in GROUPS]
    out.append(Scenario("one process runs both groups: its clock 3 s ahead, then its scrapes fail", both, 600, [
        (330, "OrchestratorClockSkew", [warning(p, group=p.group) for p in both]),
        (510, "OrchestratorDown", [warning(p, group=p.group) for p in both]),
    ]))  # fmt: skip

    pair = [Process("primary", phase=0), Process("backup", phase=9, content_offset=0.2)]
    out.append(Scenario("the backup shows content 0.2 s apart", pair, 300, [
        (60, "OrchestratorGroupsContentDiffers", []),
        (90, "OrchestratorGroupsContentDiffers", [critical(stream=s, track=s) for s in STREAMS]),
    ]))  # fmt: skip

    def refused(t: float, stream: str, endpoint: str) -> bool:
        return t < 60 or endpoint != "ingest-a"

    primary = Process("primary", phase=0, pushing=refused, failure="unauthorised")
    out.append(Scenario("ingest-a refuses the primary's credentials from 1 min", [primary, Process("backup")], 600, [
        (165, "OrchestratorEndpointUnauthorized", []),  # one transient 403 pages nobody
        (210, "OrchestratorEndpointUnauthorized",
         [endpoint_labels(primary, s, "ingest-a", state="unauthorised") for s in STREAMS]),
        (210, "OrchestratorEndpointDown", []),
        (420, "OrchestratorRedundancyLost",
         [critical(stream=s, group="primary", endpoint="ingest-a", endpoint_region="region-a") for s in STREAMS]),
    ]))  # fmt: skip

    primary = Process("primary", phase=0, backlog_seconds=lambda t: 100.0 if t >= 120 else 0.0,
                      dropped_at=(200,), restarts_at=(100, 110, 120, 130), state_failures_at=(200,))  # fmt: skip
    labels = [endpoint_labels(primary, s, e) for s in STREAMS for e, _ in ENDPOINTS]
    out.append(Scenario("the primary's backlog, drops, restarts and state writes", [primary, Process("backup")], 600, [
        (120, "OrchestratorBacklogHigh", []),
        (180, "OrchestratorBacklogHigh", labels),
        (180, "OrchestratorFragmentsDropped", []),
        (210, "OrchestratorFragmentsDropped", labels),
        (210, "OrchestratorStateWriteFailing", [warning(primary, group="primary")]),
        (120, "OrchestratorEncoderRestartLoop", []),
        (135, "OrchestratorEncoderRestartLoop", [warning(primary, group="primary")]),
        (555, "OrchestratorFragmentsDropped", []),  # 5 min on: resolved
    ]))  # fmt: skip
    return out


SCENARIOS = scenarios()


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
