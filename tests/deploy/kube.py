"""Rendering deploy/kubernetes with ``kubectl kustomize`` and reading the objects, for the deploy
tests; and materialising a rendered pod on this host (its ConfigMap, Secret and volumes as
directories, its environment) so that its container command can run as a plain process, or in
the image with those directories mounted (owned as the kubelet leaves them for the fsGroup).
"""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SHARED = KUBERNETES / "shared"
PROFILE_KEY = "profile.toml"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"


def kubectl() -> str:
    """The kubectl executable; skips (or fails under CI=true) with how to install it."""
    found = shutil.which("kubectl")
    if found is None:
        reason = ("needs kubectl to render deploy/kubernetes: apt-get install kubernetes-client "
                  "(any kubectl from 1.20 on; README, 'Two commands'); .ci/run installs it")  # fmt: skip
        if os.environ.get("CI") == "true":
            pytest.fail(f"kubectl is missing in CI: {reason}")
        pytest.skip(reason)
    return found


@functools.cache
def _render(directory: Path) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}")
    return result.stdout


def rendered_text(directory: Path) -> str:
    """``kubectl kustomize directory``'s output (YAML stream)."""
    return _render(directory)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` renders."""
    return [doc for doc in yaml.safe_load_all(_render(directory)) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    return spec


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = pod_spec(objects)["containers"]
    return dict(only)


def configmap_profile(objects: list[dict[str, Any]]) -> str:
    """The profile text of the ConfigMap the StatefulSet mounts."""
    volume = next(v for v in pod_spec(objects)["volumes"] if "configMap" in v)
    text: str = by_name(objects, "ConfigMap", volume["configMap"]["name"])["data"][PROFILE_KEY]
    return text


def secret_data(objects: list[dict[str, Any]], name: str) -> dict[str, bytes]:
    secret = by_name(objects, "Secret", name)
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def group_of(objects: list[dict[str, Any]]) -> str:
    """The group the container's args name (``up PROFILE --group NAME``)."""
    args = container(objects)["args"]
    return str(args[args.index("--group") + 1])


@dataclass
class Pod:
    """A rendered pod, materialised: its argv and environment, each mount path as a directory."""

    argv: list[str]  # the container's command and args, its paths mapped to this host
    env: dict[str, str]
    mounts: dict[str, Path]  # mountPath -> local directory
    command: list[str] = field(default_factory=list)  # the container's command and args, as in the manifest
    read_only: set[str] = field(default_factory=set)  # the mountPaths mounted readOnly
    file_modes: dict[str, int] = field(default_factory=dict)  # mountPath -> mode of a ConfigMap's or Secret's files
    empty_dirs: set[str] = field(default_factory=set)  # the mountPaths of emptyDir volumes

    def local(self, path: str) -> str:
        """``path`` as the pod sees it -> the same file on this host."""
        for mount_path, directory in sorted(self.mounts.items(), key=lambda m: -len(m[0])):
            if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
                return str(directory) + path[len(mount_path.rstrip("/")) :]
        return path


def materialise(objects: list[dict[str, Any]], root: Path) -> Pod:
    """Lay out the StatefulSet's pod under ``root``, as the kubelet would: a ConfigMap or Secret
    volume is a directory of its keys (``items`` honoured), an emptyDir a fresh empty directory,
    a volumeClaimTemplate a directory that persists across calls (the same PersistentVolumeClaim
    when the pod is started again); ``env`` values are literal or read from the rendered Secret
    or ConfigMap. The argv is the container's command and args with its paths mapped here."""
    statefulset = one(objects, "StatefulSet")
    spec = pod_spec(objects)
    spec_container = container(objects)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in statefulset["spec"].get("volumeClaimTemplates", [])}
    mounts: dict[str, Path] = {}
    read_only: set[str] = set()
    file_modes: dict[str, int] = {}
    empty_dirs: set[str] = set()
    for mount in spec_container.get("volumeMounts", []):
        name = mount["name"]
        if mount.get("readOnly"):
            read_only.add(mount["mountPath"])
        if name in claims:
            directory = root / "pvc" / name
            directory.mkdir(parents=True, exist_ok=True)
        else:
            volume = volumes[name]
            directory = root / "volumes" / name
            if directory.exists():
                shutil.rmtree(directory)  # configMap, secret and emptyDir contents are new for each pod
            directory.mkdir(parents=True)
            if "configMap" in volume:
                configmap = by_name(objects, "ConfigMap", volume["configMap"]["name"])
                data = {k: v.encode() for k, v in configmap["data"].items()}
                _write_items(directory, data, volume["configMap"].get("items"))
                file_modes[mount["mountPath"]] = volume["configMap"].get("defaultMode", 0o644)
            elif "secret" in volume:
                data = secret_data(objects, volume["secret"]["secretName"])
                _write_items(directory, data, volume["secret"].get("items"))
                file_modes[mount["mountPath"]] = volume["secret"].get("defaultMode", 0o644)
            elif "emptyDir" in volume:
                empty_dirs.add(mount["mountPath"])
            else:
                raise AssertionError(f"volume {name}: no local stand-in for {sorted(volume)}")
        mounts[mount["mountPath"]] = directory
    env: dict[str, str] = {}
    for item in spec_container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_data(objects, ref["name"])[ref["key"]].decode()
        else:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = by_name(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
    command = [*spec_container.get("command", []), *spec_container.get("args", [])]
    pod = Pod(argv=[], env=env, mounts=mounts, command=command, read_only=read_only, file_modes=file_modes,
              empty_dirs=empty_dirs)  # fmt: skip
    pod.argv = [pod.local(a) for a in command]
    return pod


def own_as_the_kubelet(pod: Pod, objects: list[dict[str, Any]]) -> None:
    """Give the pod's volume directories the group and modes the kubelet gives them for the pod's
    ``fsGroup`` (owners stay): a ConfigMap's or Secret's files in their defaultMode, readable by
    the group; an emptyDir 2777; a claim group-writable and setgid, unless its root already has
    the group (``fsGroupChangePolicy: OnRootMismatch``). Needs root."""
    group = pod_spec(objects)["securityContext"]["fsGroup"]
    for mount_path, directory in pod.mounts.items():
        claim = mount_path not in pod.file_modes and mount_path not in pod.empty_dirs
        if claim and directory.stat().st_gid == group:
            continue
        for path in [directory, *directory.rglob("*")]:
            os.chown(path, -1, group)
            mode = path.stat().st_mode & 0o7777
            if mount_path in pod.empty_dirs:
                path.chmod(0o2777)
            elif mount_path in pod.file_modes:
                path.chmod(0o755 if path.is_dir() else pod.file_modes[mount_path])
            else:
                path.chmod(mode | (0o2070 if path.is_dir() else 0o060))


def _write_items(directory: Path, data: dict[str, bytes], items: list[dict[str, str]] | None) -> None:
    chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
    for key, path in chosen.items():
        (directory / path).write_bytes(data[key])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if not selector:
        return False  # an empty selector in a pod (anti-)affinity term selects nothing useful here
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]  # fmt: skip
        if not ok:
            return False
    return True


def pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    return dict(one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"])


def quantity(text: str | int) -> float:
    """A Kubernetes quantity ("300m", "1", "256Mi") as a number (cores, bytes)."""
    units = {"m": 1e-3, "": 1.0, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match is not None, text
    return float(match.group(1)) * units[match.group(2)]


def containerfile_user() -> tuple[int, int]:
    (user,) = re.findall(r"^USER\s+(\d+):(\d+)\s*$", CONTAINERFILE.read_text(), flags=re.MULTILINE)
    return int(user[0]), int(user[1])
