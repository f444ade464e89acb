"""A pod's life on loopback: the primary overlay's rendered StatefulSet, its container command and
args run in the image built from deploy/container/Containerfile (the ``image`` fixture: buildah,
chroot isolation, so the host's network), each "pod" a new container of the image, as user and
group 10001 (the pod's securityContext), with the ConfigMap and the Secret materialised as the
files and environment variables the manifest mounts, mounted where the pod mounts them and owned
as the kubelet leaves them for the fsGroup; the PersistentVolumeClaim a directory that outlives
each "pod", mounted as the state directory; `orchestrator ingest` servers on the host's loopback
standing in for the two ingest endpoints.

Where buildah cannot run (not installed, not root) the same test runs the command as a plain
process instead, the mounts' paths mapped to their local directories: the pod simulated. Under
CI=true the image is required (imagekit.engine_present).

What the test changes in the rendered profile, and only that: the endpoints' scheme and host (to
the loopback ingest servers; the publishing point paths stay), the metrics listen address (a free
loopback port instead of the pod's 0.0.0.0:9464: the container shares the host's network) and,
simulated only, the absolute paths of the pod's mounts (to their local directories). The kubelet
signals the container's main process: in the image that is the command's process under buildah's
chroot (buildah run does not pass signals on), and SIGKILL kills every process of the container,
as the end of its PID namespace would. It shows:

1. ``/healthz`` answers while ``/readyz`` says 503 with its reason as long as no ingest server
   is up, and ``/readyz`` turns 200 only when every stream has a POST open at an ingest server;
2. SIGTERM: exit 0 within terminationGracePeriodSeconds, every POST of that process ended by its
   zero-length chunk (the ingest server logs such a POST as "ok");
3. a new process on the same "volume" continues the index: no index or timestamp is sent again;
4. SIGKILL mid-run, then a new process: it continues the index too, and stops cleanly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import imagekit
import pytest
from imagekit import Image
from kube import KUBERNETES, Pod, configmap_profile, group_of, materialise, own_as_the_kubelet, pod_spec, render
from rig import Orchestrator, free_port, get_status, wait_until

from orchestrator.profile import parse_profile

pytestmark = pytest.mark.integration

OVERLAY = KUBERNETES / "overlays" / "primary"
VENV_BIN = Path(sys.executable).parent  # where `orchestrator` is, as /opt/orchestrator/bin is in the image


class PodRun:
    """One "pod": the rendered container's argv, on the node directory ``node``; in a new container
    of ``image``, or as a process on this host when ``image`` is None."""

    def __init__(self, objects: list[dict[str, Any]], node: Path, ingest: dict[str, int], metrics_port: int,
                 log: Path, image: Image | None) -> None:  # fmt: skip
        self.pod: Pod = materialise(objects, node)
        self.log = log
        self.image = image
        assert self.pod.command[:2] == ["orchestrator", "up"]
        profile_path = Path(self.pod.local(self.pod.command[2]))
        assert profile_path.is_file()
        text = profile_path.read_text()
        for host, port in ingest.items():
            text, n = re.subn(rf"https://{re.escape(host)}(?=/)", f"http://127.0.0.1:{port}", text)
            assert n > 0, host
        text, n = re.subn(r'^listen = "0\.0\.0\.0:\d+"$', f'listen = "127.0.0.1:{metrics_port}"', text, flags=re.M)
        assert n == 1
        if image is None:
            text, n = re.subn(r'"(/[^"]*)"', lambda m: f'"{self.pod.local(m.group(1))}"', text)
            assert n > 0
        profile_path.write_text(text)
        self.main_pid: int | None = None
        with log.open("wb") as out:
            if image is None:
                # The image's environment (PATH with the package first; Python unbuffered) and the pod's.
                env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
                       "PYTHONDONTWRITEBYTECODE": "1", **self.pod.env}  # fmt: skip
                self.process = subprocess.Popen(self.pod.argv, env=env, cwd=self.pod.local("/tmp"), stdout=out,
                                                stderr=subprocess.STDOUT)  # fmt: skip
                self.main_pid = self.process.pid
            else:
                security = pod_spec(objects)["securityContext"]
                own_as_the_kubelet(self.pod, objects)
                options = ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
                for mount_path, directory in self.pod.mounts.items():
                    read_only = ":ro" if mount_path in self.pod.read_only else ""
                    options += ["--volume", f"{directory}:{mount_path}{read_only}"]
                for name, value in self.pod.env.items():
                    options += ["--env", f"{name}={value}"]
                argv = ["buildah", "run", *options, image.container(), "--", *self.pod.command]
                self.process = subprocess.Popen(argv, env=image.env, stdout=out, stderr=subprocess.STDOUT)

    def main_process(self) -> int:
        """The pid of the container's main process: the command itself (under buildah's chroot, the
        process whose command line ends with the container's args)."""
        if self.main_pid is None:
            tail = [a.encode() for a in self.pod.command[1:]]

            def found() -> bool:
                for pid in descendants(self.process.pid):
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
                    except OSError:
                        continue
                    if cmdline[-len(tail) :] == tail and b"buildah" not in cmdline[0]:
                        self.main_pid = pid
                        return True
                return False

            wait_until(found, 30, "the container's main process", [self.log])
        assert self.main_pid is not None
        return self.main_pid

    def signal(self, sig: signal.Signals) -> None:
        """What the kubelet does: ``sig`` to the container's main process; SIGKILL to each of the
        container's processes (in the image; the simulated pod's ffmpeg ends by itself)."""
        main = self.main_process()
        doomed = [main, *descendants(main)] if sig == signal.SIGKILL and self.image is not None else [main]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def exit_code(self, timeout: float) -> int:
        """The container's exit code: the command's (buildah run passes it on); a SIGKILL is -9
        simulated, and in the image whatever buildah makes of it (not 0)."""
        return self.process.wait(timeout)

    def stop_all(self) -> None:
        """Kill whatever of this pod still runs: every process below the one started, then it (a
        killed buildah run would leave the container's processes behind)."""
        if self.process.poll() is None:
            for pid in descendants(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now, parents first (Linux /proc)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop(0)
        children = []
        for task in Path(f"/proc/{parent}/task").glob("*"):  # a Go program (buildah) forks from any thread
            with contextlib.suppress(OSError):
                children += (task / "children").read_text().split()
        found += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return found


def get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
    except httpx.TransportError:
        return None


def group_posts(ports: list[int], group: str) -> list[tuple[int, dict[str, Any]]]:
    """(server port, POST) for every POST of ``group`` in the ingest servers' logs."""
    found = []
    for port in ports:
        status = get_status(port, posts=True)
        assert status is not None, f"ingest server on {port} is not answering"
        found += [(port, p) for p in status["post_log"] if p["encoder_group"] == group]
    return found


@pytest.fixture
def pod_image(request: pytest.FixtureRequest) -> Image | None:
    """The image the pods run in; None where buildah cannot run (outside CI): then simulated."""
    if imagekit.engine_present():
        image: Image = request.getfixturevalue("image")
        return image
    if shutil.which("ffmpeg") is None:
        pytest.skip("the deployed profile encodes with ffmpeg: apt-get install ffmpeg (see README)")
    return None


def test_pod_life_ready_graceful_stop_restart_and_kill(tmp_path: Path, pod_image: Image | None):
    objects = render(OVERLAY)
    grace_period = pod_spec(objects)["terminationGracePeriodSeconds"]
    group = group_of(objects)
    profile = parse_profile(configmap_profile(objects), "profile.toml")
    fragment = float(profile.presentation.fragment_duration)
    endpoints = profile.groups[group].endpoints
    hosts = sorted({urlsplit(e.url).hostname or "" for e in endpoints})
    assert len(hosts) == 2
    ingest = {host: free_port() for host in hosts}
    ports = list(ingest.values())
    metrics_port = free_port()
    node = tmp_path / "node"
    streams = [s.id for s in profile.streams]
    tracks = {(s.id, track_id) for s in profile.streams for track_id in profile.track_ids(s)}
    logs: list[Path] = []
    servers: list[Orchestrator] = []
    runs: list[PodRun] = []

    def start(n: int) -> PodRun:
        logs.append(tmp_path / f"pod-{n}.log")
        runs.append(PodRun(objects, node, ingest, metrics_port, logs[-1], pod_image))
        return runs[-1]

    def fragments(since: dict[int, int]) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """(stream, track) -> [(index, time)] over the group's POSTs with id >= since[port]."""
        seen: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        for port, post in group_posts(ports, group):
            if post["id"] >= since[port]:
                for f in post["fragments"]:
                    if f["outcome"] != "rejected":
                        seen[(post["stream"], f["track"])].append((f["index"], f["time"]))
        return seen

    def boundary() -> dict[int, int]:
        """The id the next POST at each server will have."""
        return {port: get_status(port)["posts"]["total"] + 1 for port in ports}  # type: ignore[index]

    def wait_fragments(since: dict[int, int], count: int, what: str) -> None:
        # Start-up (ffmpeg, the first whole fragment) plus ``count`` fragments, with room for a loaded machine.
        wait_until(lambda: all(len(v) >= count for v in fragments(since).values()) and
                   set(fragments(since)) == tracks, 20 + 4 * count * fragment, what, logs)  # fmt: skip

    def graceful_stop(run: PodRun, since: dict[int, int]) -> None:
        run.main_process()
        started = time.monotonic()
        run.signal(signal.SIGTERM)
        try:
            code = run.exit_code(grace_period)
        except subprocess.TimeoutExpired:
            run.stop_all()
            pytest.fail(f"no exit within terminationGracePeriodSeconds ({grace_period} s): the kubelet would "
                        f"SIGKILL it\n{run.log.read_text()[-4000:]}")  # fmt: skip
        elapsed = time.monotonic() - started
        assert code == 0, run.log.read_text()[-4000:]
        assert elapsed < grace_period
        posts = [(port, p) for port, p in group_posts(ports, group) if p["id"] >= since[port]]
        assert {p["stream"] for _, p in posts} == set(streams)
        assert len({(port, p["stream"]) for port, p in posts}) == len(ports) * len(streams)
        for port, post in posts:
            assert post["status"] == "ok", f"POST {post['id']} at {port} did not end with its zero-length chunk: {post}"

    try:
        # 1. Not ready while no ingest server is up; ready once the POSTs are.
        first = start(1)
        wait_until(lambda: (r := get(metrics_port, "/healthz")) is not None and r.status_code == 200, 30,
                   "/healthz", logs)  # fmt: skip
        deadline = time.monotonic() + 3 * fragment
        while time.monotonic() < deadline:
            ready = get(metrics_port, "/readyz")
            assert ready is not None
            assert ready.status_code == 503, "ready with no ingest server up"
            assert "no endpoint streaming" in ready.text
            time.sleep(0.5)
        for host, port in ingest.items():
            logs.append(tmp_path / f"ingest-{host}.log")
            servers.append(Orchestrator("ingest", "--listen", f"127.0.0.1:{port}", "--archive",
                                        str(tmp_path / "archive" / host), log=logs[-1]))  # fmt: skip
        since_1 = {port: 1 for port in ports}
        deadline = time.monotonic() + 40 + 10 * fragment  # the publisher's retry backoff is capped at 8 s (+25 %)
        while True:
            assert time.monotonic() < deadline, "never ready"
            ready = get(metrics_port, "/readyz")
            assert ready is not None
            if ready.status_code == 200:
                # Ready means every stream has a POST up at an ingest server, now.
                up = {p["stream"] for _, p in group_posts(ports, group) if p["status"] == "active"}
                assert up == set(streams), f"ready, but POSTs are up only for {up}"
                break
            time.sleep(0.2)
        status = get(metrics_port, "/status")
        assert status is not None
        assert status.json()["ready"] is True

        # 2. Graceful stop.
        wait_fragments(since_1, 3, "3 fragments per track from the first pod")
        graceful_stop(first, since_1)
        state_files = list((node / "pvc").rglob("*.json"))
        assert [p.name for p in state_files] == [f"{profile.presentation.name}.{group}.json"]
        if pod_image is not None:  # written by the pod's user, into the mounted volume
            assert state_files[0].stat().st_uid == pod_spec(objects)["securityContext"]["runAsUser"]
        before = fragments(since_1)

        # 3. Rescheduled on the same volume: continues.
        since_2 = boundary()
        second = start(2)
        wait_fragments(since_2, 2, "2 fragments per track from the second pod")
        second.signal(signal.SIGKILL)  # 4. then killed mid-run (OOM, lost node)
        killed = second.exit_code(10)
        assert killed == -signal.SIGKILL if pod_image is None else killed != 0
        after_second = fragments(since_2)

        since_3 = boundary()
        third = start(3)
        wait_fragments(since_3, 2, "2 fragments per track from the third pod")
        graceful_stop(third, since_3)
        after_third = fragments(since_3)

        clocks = {(s.id, tid): profile.track_clock(t) for s in profile.streams
                  for tid, t in zip(profile.track_ids(s), s.tracks, strict=True)}  # fmt: skip
        for key in sorted(tracks):
            earlier = before[key]
            for later in (after_second[key], after_third[key]):
                assert later, f"{key}: nothing from a later pod"
                assert min(i for i, _ in later) > max(i for i, _ in earlier), f"{key}: an index was sent again"
                assert min(t for _, t in later) > max(t for _, t in earlier), f"{key}: a timestamp was sent again"
                earlier = earlier + later
            for index, start_time in earlier:
                assert start_time == clocks[key].start(index), f"{key}: index {index} is off the shared clock"
        assert "supervisor.state.restored" in logs[logs.index(second.log)].read_text()
        assert "supervisor.state.restored" in third.log.read_text()
    finally:
        for run in runs:
            run.stop_all()
        for server in servers:
            server.stop()
        if pod_image is not None:
            pod_image.remove_containers()
