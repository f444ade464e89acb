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
from typing import Any

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


def test_group_names_come_from_the_data() -> None:
    """No query names a group (a third group appears by itself) or the old `region` label."""
    for title, expr in dashboard_queries(json.loads(DASHBOARD.read_text())):
        assert not re.search(r'\bgroup\s*=~?\s*"', expr), title
        assert not re.search(r"(?<![\w.])region\b", expr), title


def test_a_group_that_vanished_is_a_red_row_not_a_missing_one(tmp_path: Path) -> None:
    """The "fragments flowing" panel, evaluated by promtool on the backup's pod leaving service
    discovery (tests/deploy/scenarios.py): the backup stays, as 0 (red)."""
    from scenarios import Process, Scenario

    (expr,) = [e for title, e in dashboard_queries(json.loads(DASHBOARD.read_text())) if title.startswith(
        "Fragments flowing")]  # fmt: skip
    scenario = Scenario("backup gone", [Process("primary", phase=0), Process("backup", phase=9, gone_at=300)], 600)
    case = scenario.test_case()
    del case["alert_rule_test"]
    case["promql_expr_test"] = [{"expr": concrete(expr), "eval_time": "450s", "exp_samples": [
        {"labels": '{stream="video", group="primary"}', "value": 1},
        {"labels": '{stream="audio", group="primary"}', "value": 1},
        {"labels": '{group="backup"}', "value": 0},
    ]}]  # fmt: skip
    path = tmp_path / "dashboard.test.yml"
    path.write_text(json.dumps({"evaluation_interval": "15s", "tests": [case]}))
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_groups_in_step_panel_shows_lag_not_indices() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    lag = " ".join(e for title, e in queries if title == "Push lag behind the shared clock, per stream and group")
    assert "orchestrator_push_lag_seconds" in lag
    content = " ".join(e for title, e in queries if title == "Content offset, per stream, track and group")
    assert "orchestrator_content_offset_seconds" in content
    assert not any("last_encoded_fragment_index" in e and " - " in e for _, e in queries)


def test_the_content_spread_and_live_lock_panels_evaluated_on_two_groups(tmp_path: Path) -> None:
    """The content-offset spread and the live-lock panels, evaluated by promtool on two groups
    of one job: the backup on its own mapping (0.2 s off, established later) and a fragment off
    for the first 5 minutes, then moved to the primary's (one move); the primary's peer
    unreachable for the first 2.5 minutes. Every value exact."""
    queries = dict(dashboard_queries(json.loads(DASHBOARD.read_text())))
    job = 'job="orchestrator"'
    series = {
        f'orchestrator_live_lock_established_ms{{{job},group="primary",established_by="primary"}}': "1000x40",
        f'orchestrator_live_lock_established_ms{{{job},group="backup",established_by="backup"}}': "2000x19 1000x20",
        f'orchestrator_live_lock_offset_ticks{{{job},group="primary"}}': "5000x40",
        f'orchestrator_live_lock_offset_ticks{{{job},group="backup"}}': "23000x19 5000x20",
        f'orchestrator_live_lock_moves_total{{{job},group="backup"}}': "0x19 1x20",
        f'orchestrator_live_lock_moves_total{{{job},group="primary"}}': "0x40",
        f'orchestrator_live_peer_up{{{job},group="primary",peer="http://b:9464/metrics"}}': "0x9 1x30",
        f'orchestrator_live_peer_up{{{job},group="backup",peer="http://a:9464/metrics"}}': "1x40",
        f'orchestrator_content_offset_seconds{{{job},stream="av",track="video",group="primary"}}': "0x40",
        f'orchestrator_content_offset_seconds{{{job},stream="av",track="video",group="backup"}}': "2x19 0x20",
    }

    def expect(title: str, at: str, *samples: tuple[str, float]) -> dict[str, Any]:
        return {"expr": concrete(queries[title]), "eval_time": at,
                "exp_samples": [{"labels": labels, "value": value} for labels, value in samples]}  # fmt: skip

    one = "Live lock: one mapping across groups"
    moves = "Live lock moves, per group"
    peers = "Live lock: peers answering"
    spread = "Content offset spread across groups, per stream and track"
    case = {
        "interval": "15s",
        "input_series": [{"series": name, "values": values} for name, values in series.items()],
        "promql_expr_test": [
            expect(one, "2m", ("{" + job + "}", 0)),
            expect(one, "8m", ("{" + job + "}", 1)),
            expect(moves, "5m", ('{group="backup"}', 1), ('{group="primary"}', 0)),
            expect(moves, "8m", ('{group="backup"}', 0), ('{group="primary"}', 0)),
            expect(
                peers,
                "1m",
                ('{group="primary",peer="http://b:9464/metrics"}', 0),
                ('{group="backup",peer="http://a:9464/metrics"}', 1),
            ),
            expect(
                peers,
                "3m",
                ('{group="primary",peer="http://b:9464/metrics"}', 1),
                ('{group="backup",peer="http://a:9464/metrics"}', 1),
            ),
            expect(spread, "2m", ("{" + job + ',stream="av",track="video"}', 2)),
            expect(spread, "8m", ("{" + job + ',stream="av",track="video"}', 0)),
        ],
    }
    path = tmp_path / "live-panels.test.yml"
    path.write_text(json.dumps({"tests": [case]}))  # JSON is YAML
    result = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
