"""deploy/alertmanager/alertmanager.yml, checked without amtool: it loads, its routes name
receivers it defines, its inhibitions match alerts that exist and compare labels that both the
source and the target alerts carry (as promtool shows them firing in the scenarios), and applied
to the alerts of one ingest outage (promtool-verified), its routing and inhibitions leave one
page naming the cause."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from scenarios import ALL_ALERTS, SCENARIOS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
MATCHER = re.compile(r'^\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*$')


def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def matches(matchers: list[str], labels: dict[str, str]) -> bool:
    for text in matchers:
        found = MATCHER.match(text)
        assert found is not None, f"cannot read matcher {text!r}"
        name, op, value = found.groups()
        actual = labels.get(name, "")
        ok = {"=": actual == value, "!=": actual != value, "=~": re.fullmatch(value, actual) is not None,
              "!~": re.fullmatch(value, actual) is None}[op]  # fmt: skip
        if not ok:
            return False
    return True


def alert_names(matchers: list[str]) -> set[str]:
    return {name for name in ALL_ALERTS if matches(matchers, {"alertname": name, "severity": "critical"})
            or matches(matchers, {"alertname": name, "severity": "warning"})}  # fmt: skip


def fired_labels() -> dict[str, list[dict[str, str]]]:
    """Every alert's label sets as the scenarios expect them firing (promtool checks them exactly)."""
    out: dict[str, list[dict[str, str]]] = {}
    for scenario in SCENARIOS:
        for _, alert, expected in scenario.expect:
            out.setdefault(alert, []).extend({"alertname": alert, **labels} for labels in expected)
    return out


def test_loads_and_routes_to_receivers_it_defines() -> None:
    doc = config()
    receivers = {r["name"] for r in doc["receivers"]}
    routes = [doc["route"], *doc["route"]["routes"]]
    assert {r["receiver"] for r in routes} <= receivers
    critical = [r for r in doc["route"]["routes"] if 'severity="critical"' in r["matchers"]]
    assert len(critical) == 1
    assert critical[0]["group_by"] == ["presentation"]


@pytest.mark.parametrize("index", range(len(config()["inhibit_rules"])))
def test_inhibition_matches_real_alerts_and_compares_labels_they_carry(index: int) -> None:
    rule = config()["inhibit_rules"][index]
    fired = fired_labels()
    for side in ("source_matchers", "target_matchers"):
        names = alert_names(rule[side])
        assert names, f"{side} {rule[side]} match no alert of the rules"
        # Each alternative of an alertname regex is a real alert (a typo would match nothing, silently).
        for text in rule[side]:
            name, op, value = MATCHER.match(text).groups()  # type: ignore[union-attr]
            if name == "alertname" and op in ("=", "=~"):
                assert set(value.split("|")) <= set(ALL_ALERTS), value
        for name in names:
            assert fired.get(name), f"{name}: no scenario shows it firing"
            for labels in fired[name]:
                missing = set(rule["equal"]) - set(labels)
                assert not missing, f"{name} fires without {missing}: inhibition {index} can never apply to it"


def notify(alerts: list[dict[str, str]]) -> dict[tuple[str, tuple[str, ...]], list[dict[str, str]]]:
    """The notifications Alertmanager would send: inhibited alerts dropped, the rest grouped per
    matching route (first match) and its group_by."""
    doc = config()
    inhibited = []
    for target in alerts:
        for rule in doc["inhibit_rules"]:
            if not matches(rule["target_matchers"], target):
                continue
            if any(source is not target and matches(rule["source_matchers"], source)
                   and all(source.get(k) == target.get(k) for k in rule["equal"]) for source in alerts):  # fmt: skip
                inhibited.append(target)
                break
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, str]]] = {}
    for alert in alerts:
        if any(alert is i for i in inhibited):
            continue
        route = next(r for r in doc["route"]["routes"] if matches(r["matchers"], alert))
        key = (route["receiver"], tuple(alert.get(k, "") for k in route["group_by"]))
        groups.setdefault(key, []).append(alert)
    return groups


def test_one_ingest_outage_is_one_page_naming_the_endpoint() -> None:
    (scenario,) = [s for s in SCENARIOS if s.name.startswith("ingest-a receives nothing")]
    firing = [{"alertname": alert, **labels} for at, alert, expected in scenario.expect if at == 300
              for labels in expected]  # fmt: skip
    assert {a["severity"] for a in firing} == {"critical", "warning"}
    assert sum(a["severity"] == "critical" for a in firing) > 1  # without the config: several pages
    groups = notify(firing)
    pages = {key: alerts for key, alerts in groups.items() if key[0] == "orchestrator-page"}
    assert len(pages) == 1
    (alerts,) = pages.values()
    assert [(a["alertname"], a["endpoint"]) for a in alerts] == [("OrchestratorEndpointReceivingNothing", "ingest-a")]
    assert not [key for key in groups if key[0] == "orchestrator-ticket"], "its warnings are inhibited too"
