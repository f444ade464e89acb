"""One instance per (profile, group), and listeners that say which address is taken and who set it.

Real subprocesses, as an operator starts them. Before issue 13 a second ``up`` of the same group
with metrics off ran silently beside the first (both writing one state file, both pushing as the
group), and with metrics on the only message was ``error: [Errno 98] Address already in use``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig import demo_profile, free_port

from orchestrator.encode.statefile import hold_group_lock
from orchestrator.errors import InstanceLocked

pytestmark = pytest.mark.integration


def demo_variant(
    tmp_path: Path, *, metrics: str | None, state: bool = True, ports: tuple[int, int] | None = None
) -> Path:
    return demo_profile(tmp_path / "event.toml", ports or (free_port(), free_port()), metrics=metrics,
                        state_dir=tmp_path / "state" if state else None)  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_second_instance_of_a_group_is_refused_naming_group_holder_and_directory(tmp_path, up_process):
    profile = demo_variant(tmp_path, metrics=None)
    first = up_process(profile, "--group", "primary", log="first.log")
    try:
        second = run("up", str(profile), "--group", "primary", "--status", "log")
        other_group = up_process(profile, "--group", "backup", log="b.log")  # another group of the profile is fine
        assert other_group.stop() == 0
        assert first.process.poll() is None, "the first instance must keep running"
    finally:
        assert first.stop() == 0
    assert second.returncode == 1
    message = second.stderr
    assert "group 'primary' is already running" in message
    assert f"state directory {tmp_path / 'state'}" in message
    assert f"pid {first.process.pid} on host {socket.gethostname()}" in message
    assert "supervisor.started" not in message  # refused before going live
    assert (tmp_path / "state" / "demo.primary.lock").exists()


def test_the_lock_is_released_when_the_holder_is_killed(tmp_path, up_process):
    profile = demo_variant(tmp_path, metrics=None)
    first = up_process(profile, "--group", "primary", log="first.log")
    first.kill()
    # Free again (the kernel released it); taken now by this process, and refused to a second holder.
    with (
        hold_group_lock(tmp_path / "state", "demo.primary", "primary"),
        pytest.raises(InstanceLocked, match=rf"held by pid {os.getpid()} on host"),
        hold_group_lock(tmp_path / "state", "demo.primary", "primary"),
    ):
        pass


def test_without_a_state_dir_nothing_is_locked_and_the_log_says_so(tmp_path, up_process):
    profile = demo_variant(tmp_path, metrics=None, state=False)
    up = up_process(profile, "--group", "primary")
    assert up.stop() == 0
    assert "supervisor.lock.none group=primary reason='no [state] dir" in up.text()


def test_metrics_address_in_use_names_the_address_and_the_profile_key(tmp_path, taken_port):
    profile = demo_variant(tmp_path, metrics=f"127.0.0.1:{taken_port}")
    result = run("up", str(profile), "--group", "primary", "--duration", "5")
    assert result.returncode == 1
    assert (f"error: cannot listen on 127.0.0.1:{taken_port} (set by the profile's metrics.listen): "
            "Address already in use") in result.stderr  # fmt: skip
    assert "Traceback" not in result.stderr


def test_local_ingest_address_in_use_names_the_endpoint_that_set_it(tmp_path, taken_port):
    profile = demo_variant(tmp_path, metrics=None, ports=(taken_port, free_port()))
    result = run("up", str(profile), "--local-ingest", str(tmp_path / "archive"), "--duration", "5")
    assert result.returncode == 1
    assert (f"error: cannot listen on 127.0.0.1:{taken_port} (set by groups.primary.endpoints[region-a].url with "
            "--local-ingest): Address already in use") in result.stderr  # fmt: skip


def test_ingest_listen_in_use_names_the_address_and_the_option(tmp_path, taken_port):
    result = run("ingest", "--listen", f"127.0.0.1:{taken_port}", "--archive", str(tmp_path / "archive"))
    assert result.returncode == 1
    assert (f"error: cannot listen on 127.0.0.1:{taken_port} (set by ingest --listen): "
            "Address already in use") in result.stderr  # fmt: skip
