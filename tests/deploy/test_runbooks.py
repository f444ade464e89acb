"""docs/runbooks.md against the code: every metric, metric label, log event, `/status` field and
alert a runbook names exists, and its steps run from where an on-call is (kubectl and the
`orchestrator status` command of the image, which has no curl; no login to a node)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import trio
import yaml

from orchestrator.ops.metrics import Metrics
from orchestrator.ops.state import EncoderState, GroupState, LiveState, PublisherState
from orchestrator.ops.status import status_document

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RULE_FILES = [ROOT / "deploy" / "prometheus" / f"orchestrator-{n}-rules.yml" for n in ("group", "cross-group")]
PACKAGE = ROOT / "orchestrator"
LOG_CALL = re.compile(
    r'log\.(?:debug|info|warning|error|exception|critical|log)\(\s*(?:[\w.]+,\s*)?"([a-z_]+(?:\.[a-z_]+)+)'
)
EVENT = re.compile(r"^((?:publisher|encoder|ffmpeg|supervisor|gc|ingest|metrics)\.[a-z_.]+)")


def text() -> str:
    return RUNBOOKS.read_text()


def spans() -> list[str]:
    return re.findall(r"`([^`]+)`", text())


def live_state() -> LiveState:
    return LiveState(
        presentation="p", fragment_duration=2.0,
        publishers=[PublisherState("g", "s", "e", "r", last_index=1, last_push_monotonic=0.0)],
        encoders=[EncoderState("g", "s", last_index=1)], groups=[GroupState("g", up=True)],
    )  # fmt: skip


def exported_labels() -> dict[str, set[str]]:
    """Every series the package exports (name -> label names), each labelled metric with a child."""
    metrics = Metrics()
    live = live_state()
    metrics.describe_profile("p", ["g"], ["g"], 0.0, 2.0)
    metrics.endpoint_state.watch(live)
    metrics.push_lag.watch(live)
    metrics.seconds_since_push.track(("s", "g", "e", "r"), lambda: 1.0)
    for metric in vars(metrics).values():
        names = getattr(metric, "_labelnames", None)
        if names:
            metric.labels(*["x"] * len(names))
    out: dict[str, set[str]] = {}

    async def collect() -> None:  # in trio: the push lag reads trio's clock
        for family in metrics.registry.collect():
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
                out.setdefault(family.name, set()).update(sample.labels)

    trio.run(collect)
    return out


def logged_events() -> set[str]:
    return {m for path in PACKAGE.rglob("*.py") for m in LOG_CALL.findall(path.read_text())}


def keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys(v)}
    return set()


def test_every_metric_and_label_named_exists() -> None:
    exported = exported_labels()
    named = set(re.findall(r"\b(orchestrator_[a-z_]+)", text()))
    assert named, "no metric named"
    assert named - exported.keys() == set(), "metrics the package does not export"
    for metric, labels in re.findall(r"\b(orchestrator_[a-z_]+)\{([^}]*)\}", text()):
        for label in labels.split(","):
            name = label.split("=")[0].strip()
            assert name in exported[metric], f"{metric} has no label {name!r}"


def test_every_log_event_named_is_logged() -> None:
    events = logged_events()
    assert "encoder.live.lock" in events  # the extraction itself works
    named = {m.group(1).rstrip(".") for span in spans() if (m := EVENT.match(span))}
    assert named, "no log event named"
    assert named - events == set(), "log events the code never writes"


def test_every_status_field_named_is_in_the_status_document() -> None:
    document = status_document(live_state(), now_wall=1000.0, now_monotonic=10.0)
    named = {m for span in spans() for m in re.findall(r"^status\.([a-z_]+)$", span)}
    assert named, "no /status field named"
    assert named - keys(document) == set()


def test_every_alert_named_exists_and_has_its_section() -> None:
    alerts = {rule["alert"] for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]
              for rule in g["rules"]}  # fmt: skip
    named = set(re.findall(r"\b(Orchestrator[A-Z][A-Za-z]+)", text()))
    assert named - alerts == set(), "alerts that do not exist"
    sections = set(re.findall(r"^### (\w+)$", text(), flags=re.MULTILINE))
    assert sections == alerts


def test_steps_run_from_where_the_on_call_is() -> None:
    for line in text().splitlines():
        # The image has no curl: curl only on your own machine, through kubectl port-forward.
        assert "curl" not in line or "localhost" in line, f"curl where there is none: {line}"
    assert "chronyc" not in text(), "no shell on the nodes: the on-call cannot run chronyc there"
    assert "orchestrator status --url http://127.0.0.1:9464" in text()
    assert "`crashed`: a bug" not in text()
