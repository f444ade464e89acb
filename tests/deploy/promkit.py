"""Helpers for the tests of deploy/ and grafana/: finding promtool and prometheus (Debian's
``prometheus`` package; ``.ci/run`` installs it), and the dashboard's PromQL made concrete."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from rig import load_module

ROOT = Path(__file__).resolve().parents[2]
GROUP_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-group-rules.yml"
CROSS_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-cross-group-rules.yml"
DASHBOARD = ROOT / "grafana" / "orchestrator.json"
GENERATOR = ROOT / "grafana" / "generate.py"
HOW_TO_GET = "install Debian's prometheus package (sudo apt-get install prometheus); .ci/run installs it"


def tool(name: str) -> str:
    """The tool's path; skips with how to install it, except in CI (CI=true), where it fails."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} not found in CI: {HOW_TO_GET}")
        pytest.skip(f"{name} not found: {HOW_TO_GET}")
    return found


def generator() -> ModuleType:
    return load_module(GENERATOR, "grafana_generate")


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def concrete(expr: str, *, job: str = "orchestrator", rate_interval: str = "1m", range_: str = "5m") -> str:
    """The query as Grafana would send it: dashboard variables and Grafana's built-ins replaced."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    out = out.replace('job=~"$job"', f'job=~"{re.escape(job)}"')
    assert "$" not in out, f"a variable this test does not know: {out}"
    return out
