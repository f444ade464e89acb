"""The test rig: one way to make a profile, pick a port, wait for something, and run the
orchestrator (as processes, as an operator starts them, or in-process on trio).

* Profiles: :mod:`orchestrator.testing.profiles` (re-exported here), keyword overrides on a plain
  two-group loopback profile; bench/ uses the same builder.
* :func:`free_port`; :func:`wait_until` (sync, polls) and :func:`wait_for` (trio, polls; the
  predicate may be sync or async). Both fail with what they waited for and the logs' tails;
  :func:`wait_until` at once if a process of the rig whose log it was given exits meanwhile.
* :class:`Orchestrator`: ``python -m orchestrator ...`` with its output in a log file;
  ``stop()`` is SIGTERM and a bounded wait. The fixtures in ``conftest.py`` (``orchestrators``,
  ``ingest_server``, ``up_process``) start them, stop what is left at teardown, and add every
  log's tail to a failing test's report.
* :func:`loopback_ingest` and :func:`up_in_process`: an ingest server (optionally behind the
  fault proxy) and ``run_up`` in the test's own trio run, stopped gracefully on exit.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from orchestrator.ingest.server import IngestApp, serve_app
from orchestrator.profile import Profile
from orchestrator.push.publisher import PublisherSettings
from orchestrator.push.reconnect import RetryPolicy
from orchestrator.supervisor import Running, UpOptions, run_up
from orchestrator.testing.faultproxy import FaultProxy
from orchestrator.testing.profiles import (  # noqa: F401  re-exported: the rig is one import
    EPOCH,
    SYNTHETIC,
    audio,
    build_profile,
    endpoint,
    ffmpeg,
    group,
    profile_text,
    two_groups,
    two_streams,
    video,
    write_profile,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "profiles" / "demo.toml"
# The backup group's endpoints as profiles/demo.toml writes them (tests cut them out or edit them).
DEMO_BACKUP_ENDPOINTS = """\
  [[groups.backup.endpoints]]
  name = "region-a"
  region = "eu-west"
  url = "http://127.0.0.1:18081/live/demo.isml"
  [[groups.backup.endpoints]]
  name = "region-b"
  region = "us-east"
  url = "http://127.0.0.1:18082/live/demo.isml"
"""
LOG_TAIL = 3000
# The rig's processes by log file, so that a wait given a log knows the process that writes it.
_STARTED: weakref.WeakValueDictionary[Path, Orchestrator] = weakref.WeakValueDictionary()

# Fast enough for short tests, same shape as production (spec 7.1, 7.2): a 3 s send timeout for
# 2 s fragments, retries capped at 1 s.
TEST_SETTINGS = PublisherSettings(
    connect_timeout=2.0, send_timeout=3.0, response_timeout=3.0, idle_timeout=6.0,
    retry=RetryPolicy(base=0.2, cap=1.0, slow=1.0, jitter=0.1),
)  # fmt: skip


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free right now (TCP unless ``kind`` says otherwise)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_module(path: Path, name: str) -> ModuleType:
    """The Python file at ``path`` (a benchmark, a generator script) imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tails(logs: Iterable[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-LOG_TAIL:]}" for p in logs if p.exists())


def wait_until(predicate: Callable[[], object], timeout: float, what: str, logs: Iterable[Path] = (),
               interval: float = 0.2) -> None:  # fmt: skip
    """Poll ``predicate`` until it is true; fail after ``timeout`` s naming ``what``, with the logs.

    If a process of the rig whose log is among ``logs`` exits (or has exited) with ``predicate``
    still false, fail at once with its exit code and the logs: nothing it would have done can
    come any more. A process whose end the test has already seen (``wait()`` or ``poll()``
    returned its code) is not watched: the test ended it, or knows."""
    logs = list(logs)
    watched = [p for p in (_STARTED.get(Path(log).resolve()) for log in logs) if p and p.process.returncode is None]
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        if predicate():
            return
        for exited in [p for p in watched if p.process.poll() is not None]:
            if predicate():  # what it did before it exited may be all that was awaited
                return
            pytest.fail(f"{' '.join(exited.args[:2])} exited with code {exited.process.returncode} after "
                        f"{time.monotonic() - started:.1f} s of waiting for {what}\n{tails(logs)}")  # fmt: skip
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails(logs)}")


async def wait_for(predicate: Callable[[], object | Awaitable[object]], timeout: float, what: str,
                   interval: float = 0.05) -> None:  # fmt: skip
    """The trio :func:`wait_until`: ``predicate`` may be a plain or an async function."""
    with trio.move_on_after(timeout) as scope:
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(interval)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def get_status(port: int, posts: bool = False) -> dict[str, Any] | None:
    """An ingest server's (or ``up``'s) ``/status`` document; None while it does not answer."""
    try:
        # The whole POST log (200 records), not the newest 50 /status?posts=1 lists by default.
        response = httpx.get(f"http://127.0.0.1:{port}/status" + ("?posts=1&limit=200" if posts else ""), timeout=2)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


class Orchestrator:
    """``python -m orchestrator ARGS``, stdout and stderr in ``log``."""

    def __init__(self, *args: str, log: Path, **popen: Any) -> None:
        self.args, self.log = args, log
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *args], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)  # fmt: skip
        _STARTED[log.resolve()] = self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_logged(self, needle: str, timeout: float = 30) -> None:
        """Until ``needle`` is in the log; fails early, with the log, if the process exits first."""

        def logged() -> bool:
            if self.process.poll() is not None and needle not in self.text():
                pytest.fail(f"{self.args[0]} exited {self.process.returncode} before logging {needle!r}\n"
                            f"{tails([self.log])}")  # fmt: skip
            return needle in self.text()

        wait_until(logged, timeout, f"{needle!r} in {self.log.name}", [self.log])

    def stop(self, timeout: float = 30, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM) and wait; kill and fail, with the log, if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"process did not stop on {signal.Signals(sig).name} within {timeout} s\n{tails([self.log])}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass
class IngestServer:
    """An ``orchestrator ingest`` process: its port, archive directory and process."""

    port: int
    archive: Path
    process: Orchestrator

    @property
    def log(self) -> Path:
        return self.process.log

    def status(self, posts: bool = False) -> dict[str, Any] | None:
        return get_status(self.port, posts)


@dataclass
class Loopback:
    """An in-process ingest server and, if asked for, the fault proxy in front of it."""

    app: IngestApp
    port: int
    proxy: FaultProxy | None = None
    proxy_port: int | None = None


@asynccontextmanager
async def loopback_ingest(archive: Path, *, proxy: bool = False, **proxy_options: Any) -> AsyncIterator[Loopback]:
    """Serve an :class:`IngestApp` on a free loopback port (and, with ``proxy``, a :class:`FaultProxy`
    to it, built with ``proxy_options``) until exit; the proxy is healed first."""
    async with trio.open_nursery() as nursery:
        app = IngestApp(archive)
        _, port = await nursery.start(serve_app, app, "127.0.0.1", 0)
        loopback = Loopback(app, port)
        if proxy:
            loopback.proxy = FaultProxy(("127.0.0.1", port), **proxy_options)
            _, loopback.proxy_port = await nursery.start(loopback.proxy.run)
        try:
            yield loopback
        finally:
            if loopback.proxy is not None:
                loopback.proxy.heal()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def up_in_process(profile: Profile, registry: CollectorRegistry | None = None, *,
                        stop_within: float = 15.0, **options: Any) -> AsyncIterator[Running]:  # fmt: skip
    """``run_up`` in this trio run (status off, no signal handlers, the fast :data:`TEST_SETTINGS`
    unless ``options`` say otherwise); on exit a graceful stop: every publisher disconnected within
    ``stop_within`` s, then whatever is left is cancelled."""
    options = {"status": "off", "handle_signals": False, "publisher_settings": TEST_SETTINGS, **options}
    up_options = UpOptions(**options)
    registry = registry if registry is not None else CollectorRegistry()
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            lambda task_status: run_up(profile, up_options, registry=registry, task_status=task_status))  # fmt: skip
        try:
            yield running
        finally:
            running.stop.set()
            with trio.fail_after(stop_within):
                while any(p.connected for p in running.publishers):
                    await trio.sleep(0.05)
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()


def ffprobe_packets(path: Path) -> list[tuple[int, bool]]:
    """(pts, keyframe) of every packet, in the stream's time base (= the track's timescale)."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "0", "-show_entries", "packet=pts,flags",
         "-show_entries", "stream=codec_name,time_base", "-of", "json", str(path)],
        check=True, capture_output=True, text=True)  # fmt: skip
    data = json.loads(out.stdout)
    return [(int(p["pts"]), "K" in p["flags"]) for p in data["packets"]]


def demo_profile(path: Path, ports: tuple[int, int], *, metrics: str | None, state_dir: Path | None,
                 encoder: str = "synthetic") -> Path:  # fmt: skip
    """``profiles/demo.toml`` as shipped, pointed at this test's two ingest ``ports``, written to ``path``.

    ``metrics``: the listen address, or None for metrics off; ``state_dir``: None for none;
    ``encoder``: ``synthetic`` (no ffmpeg needed), ``ffmpeg`` (ultrafast, no fallback) or ``demo``
    (as shipped: ffmpeg, falling back to the synthetic backend)."""
    text = DEMO.read_text()
    text = text.replace("127.0.0.1:18081", f"127.0.0.1:{ports[0]}").replace("127.0.0.1:18082", f"127.0.0.1:{ports[1]}")
    text = text.replace('listen = "127.0.0.1:9464"', "enabled = false" if metrics is None else f'listen = "{metrics}"')
    text = text.replace('dir = "demo-state"', "" if state_dir is None else f'dir = "{state_dir}"')
    if encoder == "demo":
        swapped = text.count('preset = "veryfast", fallback = "synthetic"')
    elif encoder == "synthetic":
        text, swapped = re.subn(r"^encoder = .*$", 'encoder = { backend = "synthetic" }', text, flags=re.MULTILINE)
    else:
        real = 'preset = "ultrafast", fallback = "none"'
        text, swapped = re.subn(r'preset = "veryfast", fallback = "synthetic"', real, text)
    assert swapped == 2, "profiles/demo.toml changed: update rig.demo_profile"
    path.write_text(text)
    return path
