"""End to end with a real Prometheus, at production settings: the shipped alert rules (both files,
unmodified: no `for:` is shortened) and the dashboard against two real `up` processes.

On loopback: one ingest server; a fault proxy in front of it for each group; two `orchestrator
up` processes (``--group primary`` and ``--group backup``, one per pod as deployed), each
encoding with real ffmpeg and serving its metrics on a port of its own; and the real
`prometheus` binary, scraping every 15 s (the interval the rules assume) the targets it finds by
file-based service discovery, and evaluating both rule files every 15 s.

Shown through Prometheus's HTTP API (/api/v1/alerts), in one scenario of about four minutes: a
healthy pair pages nobody (and raises no warning); both groups cut off from the ingest, the
backup's target removed from the discovery file at the same moment (as Kubernetes removes an
evicted pod's) and the primary's ffmpeg killed (for the encoder panels), page
OrchestratorStreamOffAir and OrchestratorEndpointReceivingNothing, critical; healed, the off-air
page resolves and OrchestratorGroupMissing pages, naming the backup. Then every query of the
Grafana dashboard runs against that Prometheus: each must parse and return data. The longer
scenarios (for: 5m, 15-minute windows, scrape phases) run in promtool:
tests/deploy/test_alert_scenarios.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import rig
import trio
from promkit import CROSS_RULES, DASHBOARD, GROUP_RULES, concrete, dashboard_queries, tool

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
        groups={g: rig.group(rig.endpoint(port, name="ingest-a", region="eu-west"), encoder=encoder)
                for g, port in (("primary", primary_proxy), ("backup", backup_proxy))},
    )  # fmt: skip


SCRAPE = 15  # seconds: scrape and evaluation interval, as in production
PROMETHEUS_CONFIG = """
global:
  scrape_interval: 15s
  scrape_timeout: 10s
  evaluation_interval: 15s
rule_files:
  - {group_rules}
  - {cross_rules}
scrape_configs:
  - job_name: orchestrator
    file_sd_configs:
      - files: ["{targets}"]
        refresh_interval: 5s
"""


def write_targets(path: Path, addresses: list[str]) -> None:
    """The file-based service discovery file, replaced at once (as Kubernetes service discovery
    drops a deleted pod's target): a reader never sees it half written."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps([{"targets": addresses}]))
    scratch.replace(path)


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
            targets = tmp_path / "targets.json"
            addresses = {group: f"127.0.0.1:{port}" for group, port in metrics.items()}
            write_targets(targets, list(addresses.values()))
            config = tmp_path / "prometheus.yml"
            config.write_text(PROMETHEUS_CONFIG.format(group_rules=GROUP_RULES, cross_rules=CROSS_RULES,
                                                       targets=targets))  # fmt: skip
            web = rig.free_port()
            await processes.start("prometheus", [
                prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"])  # fmt: skip
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web}", timeout=5) as api:
                await run_scenario(api, proxies, ups, processes,
                                   lambda: write_targets(targets, [addresses["primary"]]))  # fmt: skip
        finally:
            for proxy in proxies.values():
                proxy.heal()
            await processes.stop_all()
            nursery.cancel_scope.cancel()


async def run_scenario(api: httpx.AsyncClient, proxies: dict[str, FaultProxy], ups: dict[str, trio.Process],
                       processes: Processes, remove_backup_target: Callable[[], None]) -> None:  # fmt: skip
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

    async def firing(name: str | None = None) -> list[dict[str, str]]:
        return [a["labels"] for a in await alerts()
                if a["state"] == "firing" and name in (None, a["labels"]["alertname"])]  # fmt: skip

    async def both_groups_pushing() -> bool:
        fresh = await query(f"orchestrator_seconds_since_last_push < {3 * FRAGMENT}")
        return {(s["metric"]["group"], s["metric"]["stream"]) for s in fresh} == {
            (g, s) for g in ("primary", "backup") for s in ("video", "audio")}  # fmt: skip

    await wait_for(both_groups_pushing, 90, "Prometheus to see both groups pushing both streams", processes)

    # 1. A healthy pair pages nobody, and warns nobody, over two evaluations and more. (Before
    #    the first pushes, the ages since the start may have set an off-air alert pending; the
    #    evaluation after both groups pushed clears it, before its `for:` ends.)
    await trio.sleep(SCRAPE + 5)
    deadline = trio.current_time() + 2 * SCRAPE + 5
    while trio.current_time() < deadline:
        assert await firing() == [], "a healthy pair must raise no alert"
        pending = [a["labels"] for a in await alerts() if a["labels"]["severity"] == "critical"]
        assert pending == [], f"nothing critical pending: {pending}"
        await trio.sleep(2)

    # The groups' push lags behind the shared clock, read from targets scraped at their own
    # phases: real pushes a fraction of a fragment after each fragment's end, in step.
    lags = {s["metric"]["group"]: float(s["value"][1])
            for s in await query("min by (group) (orchestrator_push_lag_seconds)")}  # fmt: skip
    assert set(lags) == {"primary", "backup"}
    assert all(0 < lag < 2 * FRAGMENT for lag in lags.values()), lags
    assert abs(lags["primary"] - lags["backup"]) < FRAGMENT, lags

    # 2. Both groups cut off from the ingest: off air, critical, per stream at the endpoint, and
    #    the endpoint receiving nothing. At the same moment the backup's target leaves service
    #    discovery (its pod evicted, as a region outage would), and the primary's ffmpeg is
    #    killed (a restart and an exit code for the encoder panels of the dashboard).
    for proxy in proxies.values():
        proxy.set_fault(Fault.DOWN)
    remove_backup_target()
    (ffmpeg_pid,) = children(ups["primary"].pid)
    os.kill(ffmpeg_pid, signal.SIGKILL)

    async def off_air() -> list[dict[str, str]] | None:
        labels = await firing("OrchestratorStreamOffAir")
        expected = {("video", "ingest-a"), ("audio", "ingest-a")}
        return labels if {(a["stream"], a["endpoint"]) for a in labels} == expected else None

    paged = await wait_for(off_air, 150, "OrchestratorStreamOffAir firing for both streams", processes)
    assert {a["severity"] for a in paged} == {"critical"}
    assert {a["presentation"] for a in paged} == {"e2e"}
    nothing = await firing("OrchestratorEndpointReceivingNothing")
    assert [(a["endpoint"], a["endpoint_region"], a["severity"]) for a in nothing] == [("ingest-a", "eu-west",
                                                                                         "critical")]  # fmt: skip

    # 3. Healed: the primary is on air again (off air resolves), and the backup, still gone from
    #    service discovery, is paged as missing by name: redundancy lost.
    for proxy in proxies.values():
        proxy.heal()

    async def backup_missing() -> list[dict[str, str]] | None:
        return await firing("OrchestratorGroupMissing") or None

    missing = await wait_for(backup_missing, 240, "OrchestratorGroupMissing firing for the backup", processes)
    assert [(a["group"], a["presentation"], a["severity"]) for a in missing] == [("backup", "e2e", "critical")]

    async def on_air() -> bool:
        return await firing("OrchestratorStreamOffAir") == []

    await wait_for(on_air, 60, "OrchestratorStreamOffAir to resolve: the primary alone is on air", processes)

    async def exit_code_seen() -> bool:
        return any(s["value"][1] == "-9" for s in await query('orchestrator_encoder_last_exit_code{group="primary"}'))

    assert await exit_code_seen(), "the primary's exit code -9 in Prometheus"

    # 4. Every dashboard query parses and returns data, as Grafana would send it.
    dashboard = json.loads(DASHBOARD.read_text())
    instant_targets = {t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("instant")}
    # This presentation is a test pattern: the live-lock panels have nothing to show here (they
    # must still parse); they are evaluated on two groups' series in test_dashboard.py.
    live_only = {p["title"] for p in dashboard["panels"] if p.get("description", "").startswith("Live sources only")}
    assert len(live_only) == 3, live_only
    empty = []
    now = time.time()
    for title, expr in dashboard_queries(dashboard):
        sent = concrete(expr, rate_interval="1m", range_="5m")
        if expr in instant_targets:
            response = await api.get("/api/v1/query", params={"query": sent})
        else:
            response = await api.get("/api/v1/query_range", params={"query": sent, "start": now - 300, "end": now,
                                                                      "step": SCRAPE})  # fmt: skip
        body = response.json()
        assert body["status"] == "success", f"{title}: {sent}: {body}"
        if not body["data"]["result"] and title not in live_only:
            empty.append(f"{title}: {sent}")
    assert empty == [], "dashboard queries returning nothing:\n" + "\n".join(empty)
    # The job variable: Grafana's label_values(metric, job) is the label-values API with a match.
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]).groups()
    response = await api.get(f"/api/v1/label/{label}/values", params={"match[]": metric})
    assert response.json()["data"] == ["orchestrator"]
