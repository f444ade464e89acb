"""End to end with a real Prometheus: the alert rules and the dashboard against a real `up`.

On loopback: one ingest server; a fault proxy in front of it for each group; two `orchestrator
up` processes (``--group primary`` and ``--group backup``, one per pod as deployed), each
encoding with real ffmpeg and serving its metrics on a port of its own; and the real
`prometheus` binary, scraping both every second and evaluating a copy of
deploy/prometheus/orchestrator-rules.yml whose `for:` durations are shortened (the rules under
test are otherwise untouched) every second.

Shown through Prometheus's HTTP API (/api/v1/alerts): cutting the primary's endpoints fires
OrchestratorStreamStalled for the primary (each stream), and not the all-groups alert; cutting
the backup's too fires OrchestratorStreamStalledInAllGroups; after the heal both resolve. Then
the primary's ffmpeg is killed (a restart and an exit code to show) and every query of the
Grafana dashboard runs against that Prometheus: each must parse and return data.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import rig
import trio
from promkit import DASHBOARD, RULES, concrete, dashboard_queries, tool

from orchestrator.encode.ffmpeg import HOW_TO_GET_FFMPEG, find_ffmpeg
from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.testing.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

FRAGMENT = 2  # seconds; a stall is 3 fragment durations


def e2e_profile(primary_proxy: int, backup_proxy: int) -> str:
    """Two streams (180p 15 fps video, stereo audio), both groups on ffmpeg's test pattern (no
    burnt-in clock), each through its own proxy; metrics on a free port."""
    encoder = rig.ffmpeg(source={"kind": "testpattern", "burn_in_clock": False})
    return rig.profile_text(
        name="e2e", fragment_duration=FRAGMENT, metrics={"enabled": True, "listen": "127.0.0.1:0"},
        streams={"video": [rig.video("video_180p", bitrate=200_000, width=320, height=180, frame_rate=15)],
                 "audio": [rig.audio(bitrate=64_000)]},
        groups={g: rig.group(rig.endpoint(port, name="region-a", region="eu-west"), encoder=encoder)
                for g, port in (("primary", primary_proxy), ("backup", backup_proxy))},
    )  # fmt: skip


PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: orchestrator
    static_configs:
      - targets: ["{primary}", "{backup}"]
"""


def shortened_for(rules: str) -> str:
    """The rules with each `for:` cut to a few seconds (30 s -> 2 s, 1 m -> 3 s, 5 m -> 5 s)."""
    table = {"30s": "2s", "1m": "3s", "5m": "5s"}

    def cut(match: re.Match[str]) -> str:
        return f"for: {table[match.group(1)]}"

    out = re.sub(r"for: (\w+)", cut, rules)
    assert out != rules
    return out


class Processes:
    """Child processes with their output in a log file each; all stopped at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[tuple[str, trio.Process, Path]] = []

    async def start(self, name: str, argv: list[str]) -> trio.Process:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        self.started.append((name, process, log))
        return process

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{log.read_text(errors='replace')[-3000:]}" for name, _, log in self.started)

    async def stop_all(self) -> None:
        for _, process, _ in reversed(self.started):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            for _, process, _ in self.started:
                await process.wait()
        for _, process, _ in self.started:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def wait_for(predicate, timeout: float, what: str, processes: Processes) -> Any:
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        result = await predicate()
        if result:
            return result
        await trio.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{processes.tails()}")


def listening_port(log: Path) -> int | None:
    match = re.search(r"metrics\.listening url=http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def test_alerts_fire_and_resolve_and_dashboard_queries_return_data(tmp_path: Path) -> None:
    prometheus = tool("prometheus")
    ffmpeg = find_ffmpeg(None)
    if ffmpeg is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"ffmpeg not found in CI: {HOW_TO_GET_FFMPEG}")
        pytest.skip(f"ffmpeg not found: {HOW_TO_GET_FFMPEG}")
    processes = Processes(tmp_path)
    async with trio.open_nursery() as nursery:
        app = IngestApp(tmp_path / "archive")
        _, ingest_port = await nursery.start(serve_app, app, "127.0.0.1", 0)
        proxies = {group: FaultProxy(("127.0.0.1", ingest_port)) for group in ("primary", "backup")}
        ports = {group: (await nursery.start(proxy.run))[1] for group, proxy in proxies.items()}
        profile = tmp_path / "e2e.toml"
        profile.write_text(e2e_profile(ports["primary"], ports["backup"]))
        try:
            ups = {}
            for group in ("primary", "backup"):
                ups[group] = await processes.start(
                    group, [sys.executable, "-m", "orchestrator", "up", str(profile), "--group", group, "--status",
                            "log"])  # fmt: skip

            async def metrics_ports() -> dict[str, int] | None:
                found = {group: listening_port(tmp_path / f"{group}.log") for group in ups}
                return found if all(found.values()) else None  # type: ignore[return-value]

            metrics = await wait_for(metrics_ports, 30, "both up processes to serve metrics", processes)
            rules = tmp_path / "rules.yml"
            rules.write_text(shortened_for(RULES.read_text()))
            config = tmp_path / "prometheus.yml"
            config.write_text(PROMETHEUS_CONFIG.format(rules=rules, primary=f"127.0.0.1:{metrics['primary']}",
                                                       backup=f"127.0.0.1:{metrics['backup']}"))  # fmt: skip
            web = rig.free_port()
            await processes.start("prometheus", [
                prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"])  # fmt: skip
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web}", timeout=5) as api:
                await run_scenario(api, proxies, ups, processes)
        finally:
            for proxy in proxies.values():
                proxy.heal()
            await processes.stop_all()
            nursery.cancel_scope.cancel()


async def run_scenario(api: httpx.AsyncClient, proxies: dict[str, FaultProxy], ups: dict[str, trio.Process],
                       processes: Processes) -> None:  # fmt: skip
    async def query(expr: str) -> list[dict[str, Any]]:
        try:
            response = await api.get("/api/v1/query", params={"query": expr})
        except httpx.TransportError:
            return []
        if response.status_code == 503:  # still starting: Prometheus answers plain text until it is ready
            return []
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    async def alerts() -> list[dict[str, Any]]:
        response = await api.get("/api/v1/alerts")
        return response.json()["data"]["alerts"]

    async def firing(name: str) -> list[dict[str, str]]:
        return [a["labels"] for a in await alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]

    async def present(name: str) -> list[dict[str, str]]:  # pending or firing
        return [a["labels"] for a in await alerts() if a["labels"]["alertname"] == name]

    async def both_groups_pushing() -> bool:
        fresh = await query(f"orchestrator_seconds_since_last_push < {FRAGMENT}")
        return {(s["metric"]["group"], s["metric"]["stream"]) for s in fresh} == {
            (g, s) for g in ("primary", "backup") for s in ("video", "audio")}  # fmt: skip

    await wait_for(both_groups_pushing, 60, "Prometheus to see both groups pushing both streams", processes)
    assert await present("OrchestratorStreamStalled") == []
    assert await present("OrchestratorStreamStalledInAllGroups") == []

    # 1. The primary's endpoints cut: its streams stall; the backup still covers them.
    proxies["primary"].set_fault(Fault.DOWN)

    async def primary_stalled() -> list[dict[str, str]] | None:
        labels = await firing("OrchestratorStreamStalled")
        return labels if {(a["group"], a["stream"]) for a in labels} == {("primary", "video"),
                                                                          ("primary", "audio")} else None  # fmt: skip

    stalled = await wait_for(primary_stalled, 40, "OrchestratorStreamStalled firing for the primary", processes)
    assert all(a["severity"] == "warning" for a in stalled)
    assert await present("OrchestratorStreamStalledInAllGroups") == []
    down = await wait_for(lambda: firing("OrchestratorEndpointDown"), 20, "OrchestratorEndpointDown", processes)
    assert {(a["group"], a["endpoint"], a["region"]) for a in down} == {("primary", "region-a", "eu-west")}

    # 2. The backup's endpoints cut too: viewers affected, critical.
    proxies["backup"].set_fault(Fault.DOWN)

    async def all_stalled() -> list[dict[str, str]] | None:
        labels = await firing("OrchestratorStreamStalledInAllGroups")
        return labels if {a["stream"] for a in labels} == {"video", "audio"} else None

    critical = await wait_for(all_stalled, 40, "OrchestratorStreamStalledInAllGroups firing", processes)
    assert all(a["severity"] == "critical" for a in critical)
    assert {a["group"] for a in await firing("OrchestratorStreamStalled")} == {"primary", "backup"}

    # 3. Heal: both alerts resolve (leave /api/v1/alerts).
    for proxy in proxies.values():
        proxy.heal()

    async def resolved() -> bool:
        names = {a["labels"]["alertname"] for a in await alerts()}
        return not names & {"OrchestratorStreamStalled", "OrchestratorStreamStalledInAllGroups"}

    await wait_for(resolved, 60, "both stall alerts to resolve after the heal", processes)
    await wait_for(both_groups_pushing, 30, "both groups pushing again", processes)

    # 4. Kill the primary's ffmpeg: a restart and an exit code for the encoder panels.
    (ffmpeg_pid,) = children(ups["primary"].pid)
    os.kill(ffmpeg_pid, signal.SIGKILL)

    async def exit_code_seen() -> bool:
        return any(s["value"][1] == "-9" for s in await query('orchestrator_encoder_last_exit_code{group="primary"}'))

    await wait_for(exit_code_seen, 30, "the primary's exit code -9 in Prometheus", processes)
    await wait_for(both_groups_pushing, 30, "both groups pushing after the encoder restart", processes)

    # 5. Every dashboard query parses and returns data, as Grafana would send it.
    dashboard = json.loads(DASHBOARD.read_text())
    instant_targets = {t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("instant")}
    empty = []
    now = time.time()
    for title, expr in dashboard_queries(dashboard):
        sent = concrete(expr, rate_interval="15s", range_="2m")
        if expr in instant_targets:
            response = await api.get("/api/v1/query", params={"query": sent})
        else:
            response = await api.get("/api/v1/query_range", params={"query": sent, "start": now - 120, "end": now,
                                                                      "step": 1})  # fmt: skip
        body = response.json()
        assert body["status"] == "success", f"{title}: {sent}: {body}"
        if not body["data"]["result"]:
            empty.append(f"{title}: {sent}")
    assert empty == [], "dashboard queries returning nothing:\n" + "\n".join(empty)
    # The job variable: Grafana's label_values(metric, job) is the label-values API with a match.
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]).groups()
    response = await api.get(f"/api/v1/label/{label}/values", params={"match[]": metric})
    assert response.json()["data"] == ["orchestrator"]
