"""The alert rules (the per-group and the cross-group file), checked by the real promtool and held
to the house rules: every alert has a severity, a summary and description naming what it is
about, and a runbook section; the severities follow the written rule (the per-group file never
pages; the cross-group file pages for the programme and its redundancy). The scenarios that fire
and quiet each alert are in test_alert_scenarios.py.

promtool comes with Debian's ``prometheus`` package (``sudo apt-get install prometheus``;
``.ci/run`` installs it). Without it these tests skip with that reason, except in CI
(``CI=true``), where a missing promtool is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GROUP_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-group-rules.yml"
CROSS_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-cross-group-rules.yml"
RULE_FILES = (GROUP_RULES, CROSS_RULES)
RUNBOOKS = ROOT / "docs" / "runbooks.md"
HOW_TO_GET = "promtool not found: install Debian's prometheus package (sudo apt-get install prometheus)"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{HOW_TO_GET}; in CI, .ci/run must install it")
        pytest.skip(HOW_TO_GET)
    return found


def alerts(*paths: Path) -> list[dict[str, Any]]:
    docs = [yaml.safe_load(path.read_text()) for path in paths or RULE_FILES]
    return [rule for doc in docs for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts(path))} rules found" in result.stdout


def test_severities_follow_the_rule() -> None:
    """A Prometheus that sees one group cannot know whether the other covers the programme: the
    per-group rules are warnings. The pages are the cross-group symptoms, each critical, except
    out of step (a precursor: failover still works)."""
    assert {rule["labels"]["severity"] for rule in alerts(GROUP_RULES)} == {"warning"}
    cross = {rule["alert"]: rule["labels"]["severity"] for rule in alerts(CROSS_RULES)}
    assert {name for name, severity in cross.items() if severity != "critical"} == {"OrchestratorGroupsOutOfStep"}
    for rule in alerts():
        assert "job=" not in rule["expr"], f"{rule['alert']}: no job name is assumed"


def test_every_alert_that_can_flap_waits() -> None:
    """A state alert (a gauge compared with a threshold) has a `for:`; only counters over a
    window (which hold for the window by themselves) fire at once."""
    for rule in alerts():
        if "increase(" not in rule["expr"]:
            assert "for" in rule, rule["alert"]


def test_every_alert_has_severity_text_and_runbook() -> None:
    anchors = {github_anchor(line.lstrip("#")) for line in RUNBOOKS.read_text().splitlines() if line.startswith("#")}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook_url"}, name
        url = annotations["runbook_url"]
        assert url == f"docs/runbooks.md#{name.lower()}", name
        assert name.lower() in anchors, f"{name}: no section '### {name}' in docs/runbooks.md"
        # Summary and description name what the alert is about, by the labels it keeps.
        by_clauses = re.findall(r"by \(([^)]*)\)", rule["expr"])
        kept = {label.strip() for label in by_clauses[0].split(",")} if by_clauses else set()
        for label in ("stream", "group", "endpoint", "endpoint_region", "presentation"):
            if label in kept:
                assert f"$labels.{label}" in annotations["description"], f"{name}: description misses {label}"


def test_the_docs_scrape_config_is_the_one_the_rules_assume() -> None:
    """Without an interval Prometheus scrapes every minute, and a window of a minute holds one
    sample; without honor_labels an operator-style target label `endpoint` replaces ours.
    The scrape config is the one docs/alerts.md gives."""
    section = (ROOT / "docs" / "alerts.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)]
    (config,) = [b for b in blocks if "scrape_configs" in b]
    (job,) = config["scrape_configs"]
    interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval", "1m"))
    assert interval == "15s"
    assert job["honor_labels"] is True
    assert "15 s scrape" in section
