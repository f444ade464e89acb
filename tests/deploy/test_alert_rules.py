"""The alert rules, checked and unit-tested by the real promtool, and held to the house rules:
every alert has a severity, a summary and description naming what it is about, and a runbook
section; every alert has promtool test cases that fire it and that keep it quiet.

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
RULES = ROOT / "deploy" / "prometheus" / "orchestrator-rules.yml"
RULE_TESTS = ROOT / "tests" / "deploy" / "orchestrator-rules.test.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
HOW_TO_GET = "promtool not found: install Debian's prometheus package (sudo apt-get install prometheus)"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{HOW_TO_GET}; in CI, .ci/run must install it")
        pytest.skip(HOW_TO_GET)
    return found


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            check=False, cwd=RULE_TESTS.parent)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


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
        for label in ("stream", "group", "endpoint", "region"):
            if label in kept:
                assert f"$labels.{label}" in annotations["description"], f"{name}: description misses {label}"


def test_every_alert_has_cases_firing_and_not_firing() -> None:
    """promtool passes a test file that never mentions an alert: hold the file to covering each
    one, both ways."""
    cases = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in cases["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"
    assert {case for case in fires | quiet} <= names, "test cases for alerts that do not exist"
