"""deploy/kubernetes, rendered with ``kubectl kustomize`` and checked offline: every overlay and
the shared objects pass ``kubernetes-validate --strict``, and the rendered objects keep the
invariants a deployment depends on: the groups never share a node, the probes ask the paths the
listener serves, the grace period exceeds the orchestrator's stop bound, the state volume is the
profile's state directory, the profile validates, no secret sits in a ConfigMap, the pod runs
under the Pod Security "restricted" profile, and the PrometheusRule carries the alert rules.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube import (
    KUBERNETES,
    OVERLAYS,
    PROFILE_KEY,
    ROOT,
    SHARED,
    configmap_profile,
    container,
    containerfile_user,
    group_of,
    one,
    pod_labels,
    pod_spec,
    quantity,
    render,
    rendered_text,
    secret_data,
    selects,
)
from promkit import tool

from orchestrator.encode.ffmpeg import TERMINATE_GRACE
from orchestrator.encode.ffmpeg_command import cpu_quota, ffmpeg_threads
from orchestrator.ops.listener import ROUTES
from orchestrator.profile import parse_listen, parse_profile
from orchestrator.supervisor import UpOptions

GROUP_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-group-rules.yml"
CROSS_RULES = ROOT / "deploy" / "prometheus" / "orchestrator-cross-group-rules.yml"
GLOBAL = KUBERNETES / "global"
RELAY_RULES = KUBERNETES / "relay-rules"  # the relay's alert rules (the relay itself: test_kubernetes_relay.py)
RELAY_RULES_FILE = ROOT / "deploy" / "prometheus" / "orchestrator-relay-rules.yml"
overlays = pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
OPERATOR_API = "monitoring.coreos.com/v1"  # CRDs: kubernetes-validate has no schema for them


def profile_of(objects: list[dict[str, Any]]) -> Any:
    return parse_profile(configmap_profile(objects), "configmap profile.toml")


# --- rendering and schema validation -------------------------------------------------------------


def test_there_is_a_primary_and_a_backup_overlay():
    assert {"primary", "backup"} <= {p.name for p in OVERLAYS}


@pytest.mark.parametrize(
    "directory",
    [*OVERLAYS, SHARED, GLOBAL, RELAY_RULES],
    ids=[*(p.name for p in OVERLAYS), "shared", "global", "relay-rules"],
)
def test_renders_and_passes_kubernetes_validate_strict(directory: Path, tmp_path: Path):
    objects = render(directory)
    assert objects
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered_text(directory))
    # The oldest and the newest Kubernetes the offline schemas cover.
    for version in ("1.25.0", None):
        options = ["-k", version] if version else []
        argv = [sys.executable, "-m", "kubernetes_validate", "--strict", *options, str(path)]
        result = subprocess.run(argv, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        for obj in objects:
            if obj["apiVersion"] == OPERATOR_API:
                continue  # checked by the tests below (structure, promtool)
            resource = f"{obj['kind'].lower()}/{obj['metadata']['name']}"
            assert f"passed for resource {resource}" in result.stdout, result.stdout


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path: Path):
    """The validation above can fail: a misspelt field in the StatefulSet is an error."""
    objects = render(OVERLAYS[0])
    statefulset = one(objects, "StatefulSet")
    statefulset["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(statefulset))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(path)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert "terminationGracePeriod" in result.stdout + result.stderr


# --- the group's process, its profile and its state ------------------------------------------------


@overlays
def test_one_pod_runs_up_for_its_group_without_a_shell(overlay: Path):
    objects = render(overlay)
    statefulset = one(objects, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1, "two pods of one group would push as the same group twice"
    spec = container(objects)
    group = group_of(objects)
    assert group == overlay.name
    assert spec["command"] == ["orchestrator"]
    assert spec["args"] == ["up", "/etc/orchestrator/profile.toml", "--group", group]
    assert "-c" not in spec["command"] + spec["args"]  # no `sh -c` wrapper between the kubelet and us
    assert group in profile_of(objects).groups
    assert pod_labels(objects)["encoder-group"] == group


@overlays
def test_the_profile_file_in_the_args_is_the_configmap(overlay: Path):
    objects = render(overlay)
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    volume = next(v for v in pod_spec(objects)["volumes"] if "configMap" in v)
    (mount_path,) = [p for p, m in mounts.items() if m["name"] == volume["name"]]
    assert container(objects)["args"][1] == f"{mount_path}/{PROFILE_KEY}"
    assert mounts[mount_path].get("readOnly") is True


@overlays
def test_the_configmap_profile_passes_orchestrator_validate(overlay: Path, tmp_path: Path):
    path = tmp_path / PROFILE_KEY
    path.write_text(configmap_profile(render(overlay)))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(path)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ": ok: " in result.stdout


def test_every_group_runs_the_same_profile():
    """One profile for every region: the groups agree on the shared clock only through it."""
    profiles = {overlay.name: configmap_profile(render(overlay)) for overlay in OVERLAYS}
    assert len(set(profiles.values())) == 1, "overlays must not carry their own profile"
    assert sorted(group_of(render(o)) for o in OVERLAYS) == sorted(p.name for p in OVERLAYS)


@overlays
def test_state_volume_is_the_profiles_state_dir(overlay: Path):
    objects = render(overlay)
    state_dir = profile_of(objects).state.dir
    assert state_dir is not None
    assert state_dir.is_absolute(), "a pod's state dir must be an absolute path"
    claims = {c["metadata"]["name"]: c for c in one(objects, "StatefulSet")["spec"]["volumeClaimTemplates"]}
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == str(state_dir)]
    assert mount["name"] in claims, "the state dir must be on the PersistentVolumeClaim"
    assert not mount.get("readOnly", False)
    assert claims[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]


def benchmark() -> dict[str, float]:
    """The ffmpeg row of the first bench/encoder_cpu.py table in docs/benchmarks.md (the run of
    2026-11-23, one `up` running both groups), which the pods are sized from."""
    readme = (ROOT / "docs" / "benchmarks.md").read_text()
    header = re.search(r"^backend +(orchestrator.*)$", readme, flags=re.MULTILINE)
    row = re.search(r"^ffmpeg +([0-9. -]+)$", readme, flags=re.MULTILINE)
    assert header is not None
    assert row is not None
    return {k: float(v) for k, v in zip(header.group(1).split(), row.group(1).split(), strict=True) if v != "-"}


@overlays
def test_resources_cover_the_benchmarked_need(overlay: Path):
    """Requests and limits are set, and the requests hold what bench/encoder_cpu.py measured for
    one group on this ladder (its figures quoted in the manifest), plus the memory the profile's
    backlog bound allows when every endpoint is down."""
    objects = render(overlay)
    resources = container(objects)["resources"]
    for what in ("cpu", "memory"):
        assert quantity(resources["requests"][what]) <= quantity(resources["limits"][what]), what
    figures = benchmark()
    groups = 2  # the benchmark runs primary and backup in one process
    cpu_need = (figures["orchestrator"] + figures["ffmpeg"]) / groups / 100
    assert quantity(resources["requests"]["cpu"]) >= 1.5 * cpu_need
    profile = profile_of(objects)
    group = profile.groups[group_of(objects)]
    bitrate = sum(t.bitrate for s in profile.streams for t in s.tracks)
    backlog_bytes = min(bitrate * float(group.max_backlog.seconds) / 8, int(group.max_backlog.bytes) * len(
        profile.streams)) * len(group.endpoints)  # fmt: skip
    memory_need = (figures["orch_MiB"] + figures["ffmpeg_MiB"]) * 2**20 + backlog_bytes
    assert quantity(resources["requests"]["memory"]) >= memory_need
    manifest = (KUBERNETES / "base" / "statefulset.yaml").read_text()
    for quoted in (f"{figures['orchestrator']:g} %", f"{figures['ffmpeg']:g} %", f"{figures['orch_MiB']:g} MiB",
                   f"{figures['ffmpeg_MiB']:g} MiB"):  # fmt: skip
        assert quoted in manifest, f"the sizing comment does not quote the benchmark's figure {quoted}"


# --- scheduling ------------------------------------------------------------------------------------------


def assert_groups_apart(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """No two of the rendered overlays' pods can share a node, and they prefer different zones."""
    for a, b in itertools.permutations(rendered, 2):
        anti = pod_spec(rendered[a])["affinity"]["podAntiAffinity"]
        required = [t for t in anti["requiredDuringSchedulingIgnoredDuringExecution"]
                    if t["topologyKey"] == "kubernetes.io/hostname"]  # fmt: skip
        assert any(selects(t["labelSelector"], pod_labels(rendered[b])) for t in required), f"{a} may join {b}'s node"
        preferred = [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
                     if t["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"]  # fmt: skip
        assert any(selects(t["labelSelector"], pod_labels(rendered[b])) for t in preferred), f"{a}: zone of {b}"
        # Each StatefulSet owns only its own group's pod.
        assert not selects(one(rendered[a], "StatefulSet")["spec"]["selector"], pod_labels(rendered[b]))


def test_two_groups_can_never_share_a_node_and_prefer_different_zones():
    assert_groups_apart({o.name: render(o) for o in OVERLAYS})


def test_a_third_region_as_the_readme_says(tmp_path: Path):
    """docs/kubernetes.md, "Adding a region": copy an overlay, rename its group and region, add the group to the
    profile. The new group keeps off the others' nodes, is covered by the disruption budget, and
    its profile validates; nothing in base/ or shared/ changes but the profile."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    new = tree / "overlays" / "backup2"
    shutil.copytree(tree / "overlays" / "backup", new)
    for name in ("kustomization.yaml", "group.yaml"):
        path = new / name
        path.write_text(path.read_text().replace("backup", "backup2").replace("region-b", "region-c"))
    profile = tree / "base" / "profile.toml"
    text = profile.read_text()
    backup = text[text.index("[groups.backup]") : text.index("\n#", text.index("[groups.backup]"))]
    profile.write_text(text + "\n" + backup.replace("groups.backup", "groups.backup2") + "\n")
    overlays = {p.name: render(p) for p in (tree / "overlays").iterdir()}
    assert sorted(overlays) == ["backup", "backup2", "primary"]
    assert group_of(overlays["backup2"]) == "backup2"
    assert "backup2" in profile_of(overlays["backup2"]).groups
    assert_groups_apart(overlays)
    budget = one(overlays["backup2"], "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"], pod_labels(overlays["backup2"]))
    assert not selects(budget["spec"]["selector"], pod_labels(overlays["backup"]))
    names = [one(objects, "StatefulSet")["metadata"]["name"] for objects in overlays.values()]
    assert len(set(names)) == 3


def test_each_group_is_pinned_to_its_own_region():
    regions = {}
    for overlay in OVERLAYS:
        terms = pod_spec(render(overlay))["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = terms["nodeSelectorTerms"]
        (expression,) = [e for e in term["matchExpressions"] if e["key"] == "topology.kubernetes.io/region"]
        assert expression["operator"] == "In"
        regions[overlay.name] = tuple(expression["values"])
    assert len(set(regions.values())) == len(regions), f"two groups in one region: {regions}"


@overlays
def test_no_drain_or_autoscaler_evicts_a_group_during_an_event(overlay: Path):
    """Each group has its own budget allowing no voluntary eviction (with one cluster per region,
    a budget over every group of a namespace covers one pod and lets both regions drain at once),
    and asks the autoscalers not to evict it."""
    objects = render(overlay)
    budget = one(objects, "PodDisruptionBudget")
    assert budget["spec"].get("maxUnavailable") == 0
    assert "minAvailable" not in budget["spec"]
    assert selects(budget["spec"]["selector"], pod_labels(objects))
    for other in OVERLAYS:
        if other != overlay:
            assert not selects(budget["spec"]["selector"], pod_labels(render(other))), other.name
    annotations = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert not any(o["kind"] == "PodDisruptionBudget" for o in render(SHARED))


@overlays
def test_a_new_image_or_profile_restarts_no_group_by_itself(overlay: Path):
    """Both overlays render the same profile (the same ConfigMap hash) and image: with the default
    RollingUpdate any change would restart every group at once. OnDelete: the operator restarts
    one group at a time (docs/kubernetes.md, "Changing a running deployment")."""
    statefulset = one(render(overlay), "StatefulSet")
    assert statefulset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    readme = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "kubectl wait --for=condition=Ready pod/orchestrator-primary-0" in readme
    assert readme.index("pod/orchestrator-primary-0") < readme.index("pod/orchestrator-backup-0")


@overlays
def test_guaranteed_qos_and_a_priority_class(overlay: Path):
    objects = render(overlay)
    for spec in pod_spec(objects)["containers"]:
        resources = spec["resources"]
        assert resources["requests"] == resources["limits"], f"{spec['name']}: not Guaranteed QoS"
        assert set(resources["limits"]) >= {"cpu", "memory"}
    name = pod_spec(objects)["priorityClassName"]
    (priority,) = [o for o in render(SHARED) if o["kind"] == "PriorityClass"]
    assert priority["metadata"]["name"] == name
    assert priority["value"] >= 1_000_000
    assert not priority.get("globalDefault", False)


@overlays
def test_ffmpeg_threads_are_bounded_by_the_pods_cpu_limit(overlay: Path):
    """Each ffmpeg runs as many threads as the pod's CPU limit allows (the cgroup quota that
    limit becomes, read by ``threads = "auto"``), not as many as the node has cores."""
    objects = render(overlay)
    limit = quantity(container(objects)["resources"]["limits"]["cpu"])
    quota = f"{int(limit * 100_000)} 100000"  # what the kubelet writes to cpu.max for that limit
    for name, group in profile_of(objects).groups.items():
        encoder = group.encoder
        if getattr(encoder, "backend", None) != "ffmpeg":
            continue
        threads = ffmpeg_threads(encoder.threads, cpu_quota(quota), usable_cpus=64)  # a 64-core node
        assert threads <= max(1, math.ceil(limit)), f"group {name}: {threads} ffmpeg threads for {limit} CPU"


# --- probes, graceful stop ------------------------------------------------------------------------------


@overlays
def test_probes_ask_the_paths_the_metrics_listener_serves_on_its_port(overlay: Path):
    objects = render(overlay)
    spec = container(objects)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    host, port = parse_listen(profile_of(objects).metrics.listen)
    assert profile_of(objects).metrics.enabled
    assert host in ("0.0.0.0", "::"), "the kubelet and Prometheus reach the pod's address, not its loopback"
    assert ports["metrics"] == port
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = spec[probe]["httpGet"]
        assert get["path"] in ROUTES
        assert ports.get(get["port"], get["port"]) == port
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def test_the_stop_bound_covers_ffmpegs_own_stop():
    """The supervisor's bound (UpOptions.shutdown_grace) holds the encoder's finish (2/3 of it),
    the 1 s cancel margin and ffmpeg's SIGTERM-to-SIGKILL wait; so it is the process's bound."""
    grace = UpOptions().shutdown_grace
    assert grace * 2 / 3 + 1.0 + TERMINATE_GRACE <= grace


@overlays
def test_grace_period_exceeds_the_orchestrators_stop_bound_and_both_say_so(overlay: Path):
    grace = UpOptions().shutdown_grace
    period = pod_spec(render(overlay))["terminationGracePeriodSeconds"]
    assert period > grace
    # The relation is written next to both numbers, with the numbers in force.
    manifest = (KUBERNETES / "base" / "statefulset.yaml").read_text()
    assert f"`shutdown_grace` = {grace:g} s" in manifest
    assert f"{period} s = the {grace:g} s bound" in manifest
    supervisor = (ROOT / "orchestrator" / "supervisor.py").read_text()
    assert f"terminationGracePeriodSeconds: {period}" in supervisor


# --- security --------------------------------------------------------------------------------------------------


@overlays
def test_pod_security_restricted_with_a_read_only_root(overlay: Path):
    objects = render(overlay)
    pod = pod_spec(objects)
    spec = container(objects)
    pod_context, context = pod["securityContext"], spec["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert (pod_context["runAsUser"], pod_context["runAsGroup"]) == containerfile_user()
    assert pod_context["runAsUser"] != 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert context.get("privileged", False) is False
    assert context.get("runAsUser", pod_context["runAsUser"]) != 0
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False)
    assert all("hostPort" not in p for p in spec["ports"])
    allowed = {"configMap", "secret", "emptyDir", "persistentVolumeClaim", "projected", "downwardAPI", "csi",
               "ephemeral"}  # the volume types "restricted" allows  # fmt: skip
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed, volume
    # Writable: only the state volume and /tmp.
    writable = {m["mountPath"] for m in spec["volumeMounts"] if not m.get("readOnly", False)}
    assert writable == {str(profile_of(objects).state.dir), "/tmp"}


# --- secrets ---------------------------------------------------------------------------------------------------


@overlays
def test_no_secret_value_in_a_configmap(overlay: Path):
    objects = render(overlay)
    secrets = [value.decode().strip() for s in objects if s["kind"] == "Secret"
               for value in secret_data(objects, s["metadata"]["name"]).values()]  # fmt: skip
    assert secrets, "the overlay renders its credentials Secret"
    for configmap in (o for o in objects if o["kind"] == "ConfigMap"):
        for key, text in configmap["data"].items():
            for secret in secrets:
                assert secret not in text, f"ConfigMap {configmap['metadata']['name']} key {key} holds a secret value"


@overlays
def test_every_credential_the_profile_names_comes_from_the_secret(overlay: Path):
    objects = render(overlay)
    profile = profile_of(objects)
    spec, pod = container(objects), pod_spec(objects)
    secret_volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    secret_files: dict[str, tuple[str, str]] = {}  # path in the pod -> (secret, key)
    for mount in spec["volumeMounts"]:
        if mount["name"] in secret_volumes:
            volume = secret_volumes[mount["name"]]
            for item in volume["items"]:
                secret_files[f"{mount['mountPath']}/{item['path']}"] = (volume["secretName"], item["key"])
    secret_env = {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                  for e in spec["env"] if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
    named = 0
    for endpoint in profile.groups[group_of(objects)].endpoints:
        credentials = endpoint.credentials
        assert credentials is not None, f"endpoint {endpoint.name} has no credentials"
        for path in (credentials.password_file, credentials.token_file):
            if path is not None:
                secret, key = secret_files[str(path)]
                assert key in secret_data(objects, secret)
                named += 1
        for env in (credentials.password_env, credentials.token_env):
            if env is not None:
                secret, key = secret_env[env]
                assert key in secret_data(objects, secret)
                named += 1
    assert named == len(profile.groups[group_of(objects)].endpoints)


def test_committed_credentials_are_placeholders():
    """The credential files in git hold the placeholder only: a real token committed by mistake
    fails here."""
    files = sorted(p for overlay in OVERLAYS for p in (overlay / "credentials").iterdir())
    assert files
    for path in files:
        assert path.read_text() == "CHANGE-ME\n", f"{path.relative_to(ROOT)} must hold the placeholder only"


# --- monitoring -------------------------------------------------------------------------------------------------


@overlays
def test_metrics_service_selects_its_groups_pod_on_the_metrics_port(overlay: Path):
    objects = render(overlay)
    service = one(objects, "Service")
    assert one(objects, "StatefulSet")["spec"]["serviceName"] == service["metadata"]["name"]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(objects))
    for other in OVERLAYS:
        if other != overlay:
            assert not selects({"matchLabels": service["spec"]["selector"]}, pod_labels(render(other)))
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(objects)["ports"]}


# Target labels the Prometheus operator gives a PodMonitor's targets; and external labels regional
# Prometheus setups commonly carry (kube-prometheus-stack: prometheus, prometheus_replica; Thanos:
# cluster, region, replica).
OPERATOR_TARGET_LABELS = {"job", "instance", "endpoint", "namespace", "pod", "container", "service"}
COMMON_EXTERNAL_LABELS = {"region", "cluster", "replica", "prometheus", "prometheus_replica", "tenant"}


def metric_label_names() -> set[str]:
    from orchestrator.ops.metrics import Metrics

    metrics = Metrics()
    metrics.describe_profile("p", ["g"], ["g"], 0.0, 2.0)
    metrics.initialise_endpoint(("s", "g", "e", "r"))
    metrics.initialise_group("g", ["s"])
    metrics.seconds_since_push.track(("s", "g", "e", "r"), lambda: 1.0)
    return {label for family in metrics.registry.collect() for s in family.samples for label in s.labels}


def test_podmonitor_keeps_the_orchestrators_own_labels():
    """Our `endpoint` label collides with the operator's target label of that name: the PodMonitor
    must honour ours, or every endpoint alert names endpoint "metrics"."""
    monitor = one(render(SHARED), "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    colliding = metric_label_names() & OPERATOR_TARGET_LABELS
    assert colliding == {"endpoint"}
    assert endpoint.get("honorLabels") is True
    assert endpoint["interval"] == "15s"  # the interval the rules assume (docs/alerts.md)


def test_no_metric_label_collides_with_a_common_external_label():
    assert metric_label_names() & COMMON_EXTERNAL_LABELS == set()
    for path in (GROUP_RULES, CROSS_RULES):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                assert not re.search(r"(?<![\w.])region\b", rule["expr"]), rule["alert"]
                assert "$labels.region" not in str(rule["annotations"]), rule["alert"]


def test_the_operator_objects_carry_the_label_kube_prometheus_stack_selects():
    for directory in (SHARED, GLOBAL, RELAY_RULES):
        for obj in render(directory):
            if obj["apiVersion"] == OPERATOR_API:
                assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", obj["kind"]


def test_podmonitor_scrapes_every_group():
    monitor = one(render(SHARED), "PodMonitor")
    for overlay in OVERLAYS:
        objects = render(overlay)
        assert selects(monitor["spec"]["selector"], pod_labels(objects))
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in {p["name"] for p in container(objects)["ports"]}
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize(
    ("directory", "rules"),
    [(SHARED, GROUP_RULES), (GLOBAL, CROSS_RULES), (RELAY_RULES, RELAY_RULES_FILE)],
    ids=["shared", "global", "relay-rules"],
)
def test_prometheusrule_is_generated_from_the_alert_rules(directory: Path, rules: Path):
    """shared/ (every cluster that runs a group) carries the per-group rules and only them;
    global/ (where every region is seen) the cross-group rules; relay-rules/ the relay's."""
    sys.path.insert(0, str(KUBERNETES))
    try:
        import generate_prometheusrule
    finally:
        sys.path.remove(str(KUBERNETES))
    committed = (directory / "prometheusrule.yaml").read_text()
    stale = "prometheusrule.yaml is stale: run .venv/bin/python deploy/kubernetes/generate_prometheusrule.py"
    name = one(render(directory), "PrometheusRule")["metadata"]["name"]
    assert committed == generate_prometheusrule.render(rules, name), stale
    rule = one(render(directory), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(rules.read_text())["groups"]
    assert rule["spec"]["groups"], "no alert rules"
    for overlay in OVERLAYS:
        assert not any(o["kind"] == "PrometheusRule" for o in render(overlay))


@pytest.mark.parametrize("directory", [SHARED, GLOBAL, RELAY_RULES], ids=["shared", "global", "relay-rules"])
def test_prometheusrule_passes_promtool(directory: Path, tmp_path: Path):
    promtool = tool("promtool")
    rule = one(render(directory), "PrometheusRule")
    path = tmp_path / "from-prometheusrule.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_ingest_endpoint_has_one_name_and_region_in_every_group():
    """The cross-group rules match an endpoint across groups by (endpoint, endpoint_region): a
    region spelt differently in one group would make two endpoints of one, each half-fed."""
    profile = profile_of(render(OVERLAYS[0]))
    regions: dict[str, set[str]] = {}
    for group in profile.groups.values():
        for endpoint in group.endpoints:
            regions.setdefault(endpoint.name, set()).add(endpoint.region)
    assert all(len(r) == 1 for r in regions.values()), regions
    assert all(len([g for g in profile.groups.values() if name in {e.name for e in g.endpoints}]) == len(
        profile.groups) for name in regions)  # fmt: skip
