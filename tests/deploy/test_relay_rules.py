"""The relay's alert rules (deploy/prometheus/orchestrator-relay-rules.yml) with the real promtool:
``check rules``, and ``test rules`` with the committed scenarios (an encoder going silent; two
relays whose encoders are out of phase, and a whole fragment apart); every alert with a severity
and a runbook section in docs/relay.md; every relay series a rule reads is one the relay exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from promkit import tool

from orchestrator.ops.metrics import Metrics
from orchestrator.relay.metrics import RelayMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "orchestrator-relay-rules.yml"
SCENARIOS = ROOT / "deploy" / "prometheus" / "orchestrator-relay-rules.test.yml"
DOC = ROOT / "docs" / "relay.md"


def alerts() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rules found" in result.stdout


def test_promtool_scenarios_fire_and_stay_quiet_as_written() -> None:
    result = subprocess.run([tool("promtool"), "test", "rules", SCENARIOS.name], capture_output=True, text=True,
                            check=False, cwd=SCENARIOS.parent)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    tested = yaml.safe_load(SCENARIOS.read_text())["tests"]
    fired = {case["alertname"] for test in tested for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tested for case in test["alert_rule_test"] if not case["exp_alerts"]}
    assert fired == quiet == {rule["alert"] for rule in alerts()}


def test_every_alert_has_severity_and_a_runbook_section() -> None:
    anchors = {re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in DOC.read_text().splitlines() if line.startswith("#")}  # fmt: skip
    for rule in alerts():
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict)
        assert isinstance(annotations, dict)
        assert labels["severity"] in ("warning", "critical")
        assert "for" in rule
        url = str(annotations["runbook_url"])
        assert url.startswith("docs/relay.md#")
        assert url.split("#")[1] in anchors, f"{rule['alert']}: no section {url} in docs/relay.md"


def test_the_rules_read_series_the_relay_exports() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    RelayMetrics(registry, "event")
    exported = {metric.name for metric in registry.collect()}
    exported |= {f"{name}_total" for name in exported}  # counters are collected without the suffix
    used = set(re.findall(r"\borchestrator_[a-z_]+", RULES.read_text()))
    assert used
    assert used <= exported, used - exported
