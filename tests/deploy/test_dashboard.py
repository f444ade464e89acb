"""The Grafana dashboard: the committed JSON is what grafana/generate.py writes, and everything
that can be checked without a Grafana server is checked: the SDK reads it back, the layout fits
the 24-column grid without overlaps, every query uses the datasource variable, every metric it
names exists in the package, and promtool parses every query. (Against a real Prometheus, every
query returns data: tests/deploy/test_prometheus_e2e.py.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client import CollectorRegistry
from promkit import DASHBOARD, concrete, dashboard_queries, generator, panels, tool

from orchestrator.ops.metrics import Metrics


def test_committed_dashboard_is_what_the_generator_writes() -> None:
    assert DASHBOARD.read_text() == generator().render(), "run: .venv/bin/python grafana/generate.py"


def test_sdk_reads_it_back() -> None:
    register_default_plugins()
    committed = json.loads(DASHBOARD.read_text())
    model = Dashboard.from_json(committed)
    again = json.loads(JSONEncoder(sort_keys=True).encode(model))
    assert again["uid"] == committed["uid"] == "orchestrator-live-ingest"
    assert [(p["type"], p["title"], p.get("targets")) for p in again["panels"]] == [
        (p["type"], p["title"], p.get("targets")) for p in committed["panels"]]  # fmt: skip


def test_layout_and_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) == 5
    for p in panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), p["title"]
        assert p["targets"], p["title"]
        for target in p["targets"]:
            assert 'job=~"$job"' in target["expr"], p["title"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "job"]


def test_every_metric_named_exists() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exported = {sample_name for family in registry.collect() for sample_name in
                {family.name, f"{family.name}_total"}}  # fmt: skip
    named = {m for _, expr in dashboard_queries(json.loads(DASHBOARD.read_text()))
             for m in re.findall(r"\borchestrator_[a-z_]+", expr)}  # fmt: skip
    assert named, "no metric found in the dashboard"
    assert named - exported == set()


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    promtool = tool("promtool")
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    records = [{"record": f"dashboard:query{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
