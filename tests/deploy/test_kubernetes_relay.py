"""deploy/kubernetes/relay, the optional relay, rendered with ``kubectl kustomize`` and checked
offline as the encoder groups' overlays are (tests/deploy/test_kubernetes.py): ``kubernetes-validate
--strict``; the container's command parsed by the relay's own CLI and its ``--group`` a relay
group of the mounted profile, which ``orchestrator validate`` accepts; the spool on the
PersistentVolumeClaim; the encoder's Service, the probes and the PodMonitor on the right ports;
Pod Security "restricted" with a read-only root; every credential a Secret-mounted file. And the
rendered pod run as a process on loopback (its mounts as directories): it takes an encoder's
POST with the Secret's token only, pushes it on, and a second "pod" on the same claim sends
what the first had spooled and not delivered.
"""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import trio
from kube import (
    KUBERNETES,
    OVERLAYS,
    PROFILE_KEY,
    SHARED,
    configmap_profile,
    container,
    containerfile_user,
    materialise,
    one,
    pod_labels,
    pod_spec,
    quantity,
    render,
    rendered_text,
    secret_data,
    selects,
)
from rig import IngestServer, Orchestrator, free_port, wait_for

from orchestrator.cli import main
from orchestrator.encode.synthetic import SyntheticStream
from orchestrator.ops.listener import ROUTES
from orchestrator.profile import RelayEncoder, parse_listen, parse_profile
from orchestrator.relay.server import RelayOptions, choose_group

RELAY = KUBERNETES / "relay"
RELAY_RULES = KUBERNETES / "relay-rules"


def objects() -> list[dict[str, Any]]:
    return render(RELAY)


def profile_of(rendered: list[dict[str, Any]]) -> Any:
    return parse_profile(configmap_profile(rendered), "configmap profile.toml")


def relay_args(rendered: list[dict[str, Any]]) -> list[str]:
    spec = container(rendered)
    assert spec["command"] == ["orchestrator"], "exec form, no shell: the relay takes SIGTERM itself"
    assert spec["args"][0] == "relay"
    return list(spec["args"][1:])


def relay_command() -> click.Command:
    """The relay command, a copy: parsing marks click's objects, which the CLI reference test reads after us."""
    return copy.deepcopy(main.commands["relay"])


def relay_group(rendered: list[dict[str, Any]]) -> tuple[str, RelayEncoder]:
    """The group the args name, parsed by the relay command's own options, and its encoder."""
    context = relay_command().make_context("relay", relay_args(rendered))  # raises on an unknown option
    return choose_group(profile_of(rendered), context.params["group"], "configmap profile.toml")


# --- rendering and the command ------------------------------------------------------------------------


def test_renders_and_passes_kubernetes_validate_strict(tmp_path: Path) -> None:
    rendered = objects()
    assert {o["kind"] for o in rendered} == {"ConfigMap", "Secret", "Service", "StatefulSet", "PodDisruptionBudget"}
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered_text(RELAY))
    for version in ("1.25.0", None):
        options = ["-k", version] if version else []
        result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *options, str(path)],
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        for obj in rendered:
            assert f"passed for resource {obj['kind'].lower()}/{obj['metadata']['name']}" in result.stdout


def test_the_command_is_the_relay_clis_and_runs_a_relay_group_of_the_mounted_profile() -> None:
    rendered = objects()
    args = relay_args(rendered)
    context = relay_command().make_context("relay", list(args))
    assert context.params["status"] == "log", "a pod has no terminal: log lines"
    mounts = {m["mountPath"]: m for m in container(rendered)["volumeMounts"]}
    volume = next(v for v in pod_spec(rendered)["volumes"] if "configMap" in v)
    (mount_path,) = [p for p, m in mounts.items() if m["name"] == volume["name"]]
    assert args[0] == f"{mount_path}/{PROFILE_KEY}", "the profile in the args is the ConfigMap's"
    assert mounts[mount_path].get("readOnly") is True
    group, encoder = relay_group(rendered)
    assert group == "primary"
    assert encoder.spool is not None, "the durable spool: a restarted pod resends what it had not delivered"
    assert encoder.fsync == "fragment"


def test_an_option_the_relay_does_not_have_is_refused() -> None:
    """The check above can fail: click refuses what the relay command does not take."""
    with pytest.raises(click.UsageError):
        relay_command().make_context("relay", ["/etc/orchestrator/profile.toml", "--listen", "0.0.0.0:8081"])


def test_the_configmap_profile_passes_orchestrator_validate(tmp_path: Path) -> None:
    path = tmp_path / PROFILE_KEY
    path.write_text(configmap_profile(objects()))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(path)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ": ok: " in result.stdout


def test_one_pod_that_no_update_or_drain_moves_by_itself() -> None:
    rendered = objects()
    statefulset = one(rendered, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1, "each pod has its own spool; the encoder pushes to one"
    assert statefulset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    budget = one(rendered, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 0
    assert selects(budget["spec"]["selector"], pod_labels(rendered))
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    period = pod_spec(rendered)["terminationGracePeriodSeconds"]
    assert period > RelayOptions().shutdown_grace
    assert f"`shutdown_grace` = {RelayOptions().shutdown_grace:g} s" in (RELAY / "statefulset.yaml").read_text()


def test_the_spool_is_on_the_persistent_volume_claim() -> None:
    rendered = objects()
    _, encoder = relay_group(rendered)
    assert encoder.spool is not None
    assert encoder.spool.is_absolute()
    claims = {c["metadata"]["name"]: c for c in one(rendered, "StatefulSet")["spec"]["volumeClaimTemplates"]}
    (mount,) = [m for m in container(rendered)["volumeMounts"] if m["mountPath"] == str(encoder.spool)]
    assert mount["name"] in claims
    assert not mount.get("readOnly", False)
    assert claims[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]


# --- ports, Services, probes, monitoring ---------------------------------------------------------------


def test_the_encoders_service_and_the_metrics_service_reach_the_pods_listeners() -> None:
    rendered = objects()
    _, encoder = relay_group(rendered)
    profile = profile_of(rendered)
    ports = {p["name"]: p["containerPort"] for p in container(rendered)["ports"]}
    listen_host, listen_port = parse_listen(encoder.listen)
    metrics_host, metrics_port = parse_listen(profile.metrics.listen)
    assert profile.metrics.enabled
    assert profile.monitor.enabled, "/monitor beside /status"
    assert listen_host == metrics_host == "0.0.0.0", "the Service and the kubelet reach the pod's address"
    assert (ports["ingest"], ports["metrics"]) == (listen_port, metrics_port)
    services = {s["metadata"]["name"]: s for s in rendered if s["kind"] == "Service"}
    ingest, metrics = services["orchestrator-relay"], services["orchestrator-relay-metrics"]
    assert one(rendered, "StatefulSet")["spec"]["serviceName"] == "orchestrator-relay-metrics"
    for service, port in ((ingest, "ingest"), (metrics, "metrics")):
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(rendered))
        (entry,) = service["spec"]["ports"]
        assert entry["targetPort"] == port
    assert ingest["spec"]["publishNotReadyAddresses"] is True, "the first POST comes before /readyz says ready"


def test_probes_ask_the_health_endpoints_and_readiness_is_the_encoder_listener() -> None:
    rendered = objects()
    spec = container(rendered)
    for probe in ("startupProbe", "livenessProbe"):
        assert spec[probe]["httpGet"]["path"] == "/healthz"
        assert spec[probe]["httpGet"]["path"] in ROUTES
        assert spec[probe]["httpGet"]["port"] == "metrics"
    assert spec["readinessProbe"] == {**spec["readinessProbe"], "tcpSocket": {"port": "ingest"}}


def test_the_shared_podmonitor_scrapes_the_relay_and_no_group_selector_takes_its_pod() -> None:
    rendered = objects()
    monitor = one(render(SHARED), "PodMonitor")
    assert selects(monitor["spec"]["selector"], pod_labels(rendered))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container(rendered)["ports"]}
    relay = pod_labels(rendered)
    for overlay in OVERLAYS:
        group = render(overlay)
        for obj in group:
            selector = obj.get("spec", {}).get("selector")
            if obj["kind"] == "Service":
                selector = {"matchLabels": selector}
            if selector:
                assert not selects(selector, relay), f"{overlay.name}'s {obj['kind']} would take the relay's pod"
        for obj in rendered:
            selector = obj.get("spec", {}).get("selector")
            if obj["kind"] == "Service":
                selector = {"matchLabels": selector}
            if selector:
                assert not selects(selector, pod_labels(group)), f"the relay's {obj['kind']} takes {overlay.name}"


def test_the_relays_alert_rules_are_its_two_alerts() -> None:
    """relay-rules/ is rendered, validated, checked fresh and by promtool with shared/ and global/
    (test_kubernetes.py); here: it carries the relay's two alerts and nothing else."""
    rule = one(render(RELAY_RULES), "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"OrchestratorRelayEncoderSilent", "OrchestratorRelayTimingDiverged"}


# --- security and credentials --------------------------------------------------------------------------


def test_pod_security_restricted_with_a_read_only_root_and_guaranteed_resources() -> None:
    rendered = objects()
    pod, spec = pod_spec(rendered), container(rendered)
    pod_context, context = pod["securityContext"], spec["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert (pod_context["runAsUser"], pod_context["runAsGroup"]) == containerfile_user() == (10001, 10001)
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False)
    assert all("hostPort" not in p for p in spec["ports"])
    writable = {m["mountPath"] for m in spec["volumeMounts"] if not m.get("readOnly", False)}
    assert writable == {str(relay_group(rendered)[1].spool), "/tmp"}
    resources = spec["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"
    assert quantity(resources["requests"]["memory"]) >= 2 * 64 * 2**20, "the backlog bound of both endpoints"
    (priority,) = [o for o in render(SHARED) if o["kind"] == "PriorityClass"]
    assert pod["priorityClassName"] == priority["metadata"]["name"]


def test_every_credential_the_relay_group_names_is_a_secret_mounted_file() -> None:
    rendered = objects()
    group, encoder = relay_group(rendered)
    spec, pod = container(rendered), pod_spec(rendered)
    secret_volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    files: dict[str, tuple[str, str]] = {}
    for mount in spec["volumeMounts"]:
        if mount["name"] in secret_volumes:
            assert mount.get("readOnly") is True
            volume = secret_volumes[mount["name"]]
            for item in volume["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (volume["secretName"], item["key"])
    credentials = [encoder.credentials] + [e.credentials for e in profile_of(rendered).groups[group].endpoints]
    named = []
    for c in credentials:
        assert c is not None, "the encoder and every endpoint have credentials"
        assert c.password_env is None, "files, not environment variables"
        assert c.token_env is None, "files, not environment variables"
        named += [str(p) for p in (c.password_file, c.token_file) if p is not None]
    assert len(named) == 3
    for path in named:
        secret, key = files[path]
        assert key in secret_data(rendered, secret)
    secrets = [v.decode().strip() for s in rendered if s["kind"] == "Secret"
               for v in secret_data(rendered, s["metadata"]["name"]).values()]  # fmt: skip
    configmap = one(rendered, "ConfigMap")
    for value in secrets:
        assert value not in configmap["data"][PROFILE_KEY]


def test_committed_credentials_are_placeholders() -> None:
    files = sorted((RELAY / "credentials").iterdir())
    assert [p.name for p in files] == ["encoder-token", "ingest-a-token", "ingest-b-password"]
    for path in files:
        assert path.read_text() == "CHANGE-ME\n", f"{path.name} must hold the placeholder only"


# --- the rendered pod, run ------------------------------------------------------------------------------


class RelayPod:
    """The rendered relay pod as a process on this host: its mounts as directories under
    ``node`` (the claim persists across pods), the endpoints' hosts and the listen addresses
    moved to loopback, the mount paths in the profile mapped to their directories."""

    def __init__(self, rendered: list[dict[str, Any]], node: Path, ingest: dict[str, int], listen: int,
                 metrics: int, orchestrators: Any, log: str) -> None:  # fmt: skip
        pod = materialise(rendered, node)
        profile_path = Path(pod.local(pod.command[2]))
        text = profile_path.read_text()
        for host, port in ingest.items():
            text, n = re.subn(rf"https://{re.escape(host)}(?=/)", f"http://127.0.0.1:{port}", text)
            assert n > 0, host
        text, n = re.subn(r'listen = "0\.0\.0\.0:8081"', f'listen = "127.0.0.1:{listen}"', text)
        assert n == 2  # the primary and the backup relay groups
        text, n = re.subn(r'^listen = "0\.0\.0\.0:9464"$', f'listen = "127.0.0.1:{metrics}"', text, flags=re.M)
        assert n == 1
        text = re.sub(r'"(/[^"]*)"', lambda m: f'"{pod.local(m.group(1))}"', text)
        profile_path.write_text(text)
        assert pod.argv[:2] == ["orchestrator", "relay"]
        assert set(pod.env) == {"XDG_CACHE_HOME"}, "no secret in the environment: files only"
        self.process: Orchestrator = orchestrators(*pod.argv[1:], log=log, cwd=pod.local("/tmp"))
        self.token = (Path(pod.local("/etc/orchestrator-credentials")) / "encoder-token").read_text().strip()
        self.spool = Path(pod.local(str(relay_group(rendered)[1].spool)))


async def test_the_rendered_pod_takes_the_encoders_push_with_the_secrets_token_and_resends_after_a_kill(
    tmp_path: Path, ingest_server: Any, orchestrators: Any
) -> None:
    rendered = objects()
    profile = profile_of(rendered)
    ingest_a = ingest_server("ingest-a")
    dead_b = free_port()  # ingest-b unreachable while the first pod runs
    listen, metrics = free_port(), free_port()
    hosts = {"ingest-a.example.net": ingest_a.port, "ingest-b.example.net": dead_b}
    first = RelayPod(rendered, tmp_path / "node", hosts, listen, metrics, orchestrators, "relay-1.log")
    await wait_for(lambda: "relay.started" in first.process.text(), 30, "the relay pod to start")
    assert first.token == "CHANGE-ME"
    url = f"http://127.0.0.1:{listen}/live/event.isml/Streams({profile.streams[0].id})"
    source = SyntheticStream(profile, profile.streams[0])
    body = source.header.data + b"".join(f.data for k in range(3) for f in source.fragment(7000 + k))
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"http://127.0.0.1:{metrics}/healthz")).status_code == 200
        assert (await client.get(f"http://127.0.0.1:{metrics}/monitor")).status_code == 200
        refused = await client.post(url, content=b"")  # (a body the relay refuses unread leaves httpx a warning)
        assert refused.status_code == 401, "no token, no push"
        accepted = await client.post(url, content=body, headers={"Authorization": f"Bearer {first.token}"})
        assert accepted.status_code == 200

    def archived(server: IngestServer) -> int:
        status = server.status() or {}
        streams = status.get("publishing_points", {}).get("live/event", {}).get("streams", {})
        return sum(t["fragments_archived"] for s in streams.values() for t in s.get("tracks", {}).values())

    fragments = 3 * len(profile.streams[0].tracks)
    await wait_for(lambda: archived(ingest_a) == fragments, 30, "ingest-a to archive every fragment")
    assert list(first.spool.rglob("*.seg")), "the spool holds what ingest-b has not had"
    first.process.process.send_signal(signal.SIGKILL)
    first.process.process.wait()

    ingest_b = ingest_server("ingest-b")  # back, at another port: the second pod's profile says where
    hosts["ingest-b.example.net"] = ingest_b.port
    second = RelayPod(rendered, tmp_path / "node", hosts, listen, metrics, orchestrators, "relay-2.log")
    await wait_for(lambda: "relay.started" in second.process.text(), 30, "the second relay pod to start")
    assert "relay.recovered" in second.process.text()
    await wait_for(lambda: archived(ingest_b) == fragments, 30, "ingest-b to get what the first pod had spooled")
    assert second.process.stop() == 0
    await trio.sleep(0)
