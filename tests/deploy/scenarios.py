"""Production-like promtool scenarios for the alert rules: processes modelled second by second and
scraped as Prometheus would, every 15 s, each target at its own phase of the interval.

Theory of operation
-------------------
A :class:`Process` is one ``orchestrator up --group G`` as the code exports it (the metric names
and labels of orchestrator.ops.metrics): it pushes fragment n of every stream to each endpoint
at ``(n + 1) x F + latency`` seconds after the shared-clock epoch (time 0, also its start), unless
its ``pushing`` function says that endpoint is cut at that moment; it reports the age of its
last push (from its start before the first), the lag of that push behind the shared clock, its
last encoded index, the state of each endpoint, and every group of the profile. Its target is
scraped at ``phase + 15 k`` seconds; in between, the series have no sample (``_``). A target that
leaves service discovery (``gone_at``) gets one staleness marker on every series, as Prometheus
writes when a target disappears, then nothing; a target whose scrapes fail (``down_at``) gets the
markers and ``up 0``.

:func:`promtool_file` turns scenarios into a ``promtool test rules`` document (series at 1 s
resolution, rules evaluated every 15 s). The annotations are left out of the rules under test
(promtool compares them too, and this module does not render templates): the expressions,
``for:`` and labels are the shipped ones, read from the files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
GROUP_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-group-rules.yml"
CROSS_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-cross-group-rules.yml"

SCRAPE = 15  # seconds: the interval the rules assume (docs/alerts.md, "Scrape interval")
F = 2  # fragment duration, seconds
PRESENTATION = "event"
GROUPS = ("primary", "backup")
STREAMS = ("video", "audio")
ENDPOINTS = (("ingest-a", "region-a"), ("ingest-b", "region-b"))
STATES = ("streaming", "waiting", "reconnecting", "unauthorised", "not_found")


def always(t: float, stream: str, endpoint: str) -> bool:
    return True


@dataclass
class Process:
    group: str
    phase: int = 0  # second of its first scrape (0..14)
    latency: float = 0.4  # seconds from a fragment's end on the shared clock to its push
    behind: int = 0  # fragments behind the shared clock (a late or mis-set group)
    pushing: Callable[[float, str, str], bool] = always
    failure: str = "reconnecting"  # the endpoint state while ``pushing`` is false
    gone_at: int | None = None  # leaves service discovery (pod evicted, deleted, Pending)
    down_at: int | None = None  # scrapes fail from then (up 0)
    reconnect_every: int | None = None  # ingest-b drops the POST every N seconds (flapping)
    skew: float = 0.0  # wall clock error, seconds
    backlog_seconds: Callable[[float], float] = lambda t: 0.0
    dropped_at: tuple[int, ...] = ()
    restarts_at: tuple[int, ...] = ()
    state_failures_at: tuple[int, ...] = ()
    content_offset: float = 0.0
    instance: str = ""
    runs: tuple[str, ...] = ()  # the other groups this same process runs (model it as one Process per group)

    def __post_init__(self) -> None:
        self.instance = self.instance or f"{self.group}:9464"

    def target(self) -> dict[str, str]:
        return {"job": "orchestrator", "instance": self.instance}

    def _first_push(self) -> float:
        return F + self.latency + self.behind * F

    def last_push(self, t: float, stream: str, endpoint: str) -> float | None:
        """When the last push at or before ``t`` happened (None: never)."""
        first = self._first_push()
        if t < first:
            return None
        n = math.floor((t - first) / F)
        while n >= 0:
            at = first + n * F
            if self.pushing(at, stream, endpoint):
                return at
            n -= 1
        return None

    def samples(self, t: float) -> dict[str, float]:
        """Every series (as its text) and its value when scraped at ``t``."""
        out: dict[str, float] = {}
        target = self.target()

        def add(name: str, labels: dict[str, str], value: float) -> None:
            out[series_text(name, {**target, **labels})] = value

        add("orchestrator_fragment_duration_seconds", {"presentation": PRESENTATION}, F)
        for g in GROUPS:
            add("orchestrator_profile_group_info", {"presentation": PRESENTATION, "group": g},
                1 if g == self.group or g in self.runs else 0)  # fmt: skip
        add("orchestrator_wall_clock_seconds", {}, t + self.skew)
        add("orchestrator_backlog_limit_seconds", {"group": self.group}, 120)
        add("orchestrator_backlog_limit_bytes", {"group": self.group}, 64 * 2**20)
        for reason in ("exited", "killed", "crashed", "stalled"):
            count = sum(1 for at in self.restarts_at if at <= t) if reason == "stalled" else 0
            add("orchestrator_encoder_restarts_total", {"group": self.group, "reason": reason}, count)
        add("orchestrator_state_write_failures_total", {"group": self.group},
            sum(1 for at in self.state_failures_at if at <= t))  # fmt: skip
        encoded = math.floor((t - self.latency - self.behind * F) / F) - 1
        for stream in STREAMS:
            add("orchestrator_last_encoded_fragment_index", {"stream": stream, "group": self.group}, max(encoded, 0))
            add("orchestrator_content_offset_seconds", {"stream": stream, "group": self.group, "track": stream},
                self.content_offset)  # fmt: skip
            for endpoint, region in ENDPOINTS:
                labels = {"stream": stream, "group": self.group, "endpoint": endpoint, "endpoint_region": region}
                last = self.last_push(t, stream, endpoint)
                add("orchestrator_seconds_since_last_push", {"presentation": PRESENTATION, **labels},
                    t - (0.0 if last is None else last))  # fmt: skip
                if last is not None:
                    add("orchestrator_push_lag_seconds", {"presentation": PRESENTATION, **labels},
                        self.latency + self.behind * F)  # fmt: skip
                    add("orchestrator_last_push_time_seconds", labels, last)
                ok = self.pushing(t, stream, endpoint)
                state = "streaming" if ok else self.failure
                for s in STATES:
                    add("orchestrator_endpoint_state", {**labels, "state": s}, 1 if s == state else 0)
                add("orchestrator_endpoint_up", labels, 1 if ok else 0)
                reconnects = t // self.reconnect_every if self.reconnect_every and endpoint == "ingest-b" else 0
                add("orchestrator_reconnects_total", labels, reconnects)
                add("orchestrator_dropped_fragments_total", labels, sum(1 for at in self.dropped_at if at <= t))
                add("orchestrator_backlog_seconds", labels, self.backlog_seconds(t))
                add("orchestrator_backlog_bytes", labels, 0)
        return out

    def series(self, duration: int) -> dict[str, list[str]]:
        """Each series as promtool tokens at 1 s resolution over ``duration`` seconds."""
        tokens: dict[str, list[str]] = {}
        up = series_text("up", self.target())
        marked = False
        for t in range(duration):
            scraped: dict[str, str] = {}
            if (t - self.phase) % SCRAPE == 0 and t >= self.phase:
                gone = self.gone_at is not None and t >= self.gone_at
                down = self.down_at is not None and t >= self.down_at
                if gone or down:
                    if not marked:
                        scraped = dict.fromkeys(tokens, "stale")
                        marked = True
                    if down and not gone:
                        scraped[up] = "0"
                else:
                    scraped = {name: _number(value) for name, value in self.samples(t).items()}
                    scraped[up] = "1"
            for name in scraped.keys() - tokens.keys():
                tokens[name] = ["_"] * t
            for name, values in tokens.items():
                values.append(scraped.get(name, "_"))
        return tokens


def series_text(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


@dataclass
class Scenario:
    name: str
    processes: list[Process]
    duration: int  # seconds
    # (eval time in seconds, alert name, expected alerts: each its labels without alertname)
    expect: list[tuple[int, str, list[dict[str, str]]]] = field(default_factory=list)

    def test_case(self) -> dict[str, Any]:
        series: dict[str, list[str]] = {}
        for process in self.processes:
            series.update(process.series(self.duration))
        return {
            "name": self.name,
            "interval": "1s",
            "input_series": [{"series": name, "values": " ".join(values)} for name, values in series.items()],
            "alert_rule_test": [
                {"eval_time": f"{at}s", "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in alerts]}
                for at, alert, alerts in self.expect
            ],
        }


def without_annotations(rules_text: str) -> str:
    doc = yaml.safe_load(rules_text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return yaml.safe_dump(doc, sort_keys=False)


def promtool_file(scenarios: list[Scenario], directory: Path, rule_files: list[Path] | None = None) -> Path:
    """Write the rules under test (annotations left out) and the scenarios as a promtool test
    file into ``directory``; returns the test file's path."""
    names = []
    for i, rules in enumerate(rule_files or [GROUP_RULES, CROSS_RULES]):
        copy = directory / f"rules-{i}.yml"
        copy.write_text(without_annotations(rules.read_text()))
        names.append(copy.name)
    path = directory / "scenarios.test.yml"
    doc = {"rule_files": names, "evaluation_interval": f"{SCRAPE}s", "tests": [s.test_case() for s in scenarios]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1_000_000))
    return path


# The scenarios themselves: tests/deploy/test_alert_scenarios.py runs each with promtool,
# tests/deploy/test_alertmanager.py routes what they fire.

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
        (1260, "OrchestratorPresentationGone", []),  # 15 min on: forgotten (docs/kubernetes.md, "Ending an event")
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
