"""The one-instance lock of the state directory, fast and direct: the lock itself (``flock`` on
``<dir>/<presentation>.<group>.lock``, two holders in one process conflict as two processes do)
and ``up`` refusing to go live while another holder has it. ``tests/test_instances.py`` proves the
same with real processes, as an operator meets it."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from prometheus_client import CollectorRegistry
from rig import build_profile, two_groups

from orchestrator.encode.statefile import hold_group_lock, lock_path
from orchestrator.errors import InstanceLocked
from orchestrator.supervisor import UpOptions, run_up


def test_a_held_lock_refuses_a_second_holder_naming_group_holder_and_directory(tmp_path):
    directory = tmp_path / "state"
    with hold_group_lock(directory, "demo.primary", "primary") as path:
        assert path == lock_path(directory, "demo.primary")
        holder = f"pid {os.getpid()} on host {socket.gethostname()}"
        assert path.read_text() == holder + "\n"
        with pytest.raises(InstanceLocked) as refused, hold_group_lock(directory, "demo.primary", "primary"):
            pass
        message = str(refused.value)
        assert "group 'primary' is already running" in message
        assert f"state directory {directory}" in message
        assert f"held by {holder}" in message
        assert path.read_text() == holder + "\n"  # the refused one wrote nothing


def test_the_lock_is_free_again_once_released(tmp_path):
    directory = tmp_path / "state"
    with hold_group_lock(directory, "demo.primary", "primary"):
        pass
    with hold_group_lock(directory, "demo.primary", "primary"):  # no InstanceLocked
        pass


def test_other_groups_and_presentations_have_their_own_locks(tmp_path):
    directory = tmp_path / "state"
    with (
        hold_group_lock(directory, "demo.primary", "primary"),
        hold_group_lock(directory, "demo.backup", "backup"),
        hold_group_lock(directory, "other.primary", "primary"),
    ):
        assert sorted(p.name for p in directory.glob("*.lock")) == ["demo.backup.lock", "demo.primary.lock",
                                                                    "other.primary.lock"]  # fmt: skip


async def test_up_refuses_to_go_live_while_the_group_lock_is_held(tmp_path):
    """``up`` takes the lock before any task starts: with the primary's lock held, it raises
    InstanceLocked and never reports started (nothing is pushed: the endpoint's port is 1)."""
    state = tmp_path / "state"
    profile = build_profile(name="locked", groups=two_groups(1), state_dir=state)
    options = UpOptions(groups=["primary"], status="off", handle_signals=False)
    with hold_group_lock(state, "locked.primary", "primary"), pytest.raises(InstanceLocked, match="'primary'"):
        with trio.fail_after(10):  # an up that went live would run until stopped
            await run_up(profile, options, registry=CollectorRegistry())
