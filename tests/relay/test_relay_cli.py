"""``orchestrator relay`` as an operator runs it: a profile whose group is not a relay, or a relay
group with half a TLS pair, exits 2 naming the file and the key; ``validate`` accepts a relay
group; SIGTERM stops a running relay with exit 0."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from relayrig import relay_profile
from rig import Orchestrator, free_port, write_profile

from orchestrator.testing.profiles import endpoint, group


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


def test_a_profile_without_a_relay_group_exits_2(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "plain.toml", groups={g: group(endpoint(1)) for g in ("primary", "backup")})
    result = run("relay", str(profile))
    assert result.returncode == 2, result.stderr
    assert f"{profile}: groups: choose the relay group with --group (relay groups: none)" in result.stderr
    result = run("relay", str(profile), "--group", "backup")
    assert result.returncode == 2, result.stderr
    assert "groups.backup.encoder.backend: a relay runs a group whose encoder is" in result.stderr


def test_half_a_tls_pair_is_a_profile_error(tmp_path: Path) -> None:
    profile = relay_profile(tmp_path / "relay.toml", listen=free_port(), ports=[1], metrics=free_port(),
                            tls_cert="relay.pem")  # fmt: skip
    result = run("validate", str(profile))
    assert result.returncode == 2
    assert "groups.primary.encoder" in result.stderr
    assert "give both tls_cert and tls_key, or neither" in result.stderr


def test_validate_accepts_a_relay_group_and_sigterm_stops_the_relay(
    tmp_path: Path, orchestrators: Callable[..., Orchestrator]
) -> None:
    listen = free_port()
    profile = relay_profile(tmp_path / "relay.toml", listen=listen, ports=[free_port()], metrics=free_port(),
                            spool=tmp_path / "spool")  # fmt: skip
    assert run("validate", str(profile)).returncode == 0
    relay = orchestrators("relay", str(profile), "--status", "log", log="relay.log")
    relay.wait_logged(f"relay.started group=primary listen=127.0.0.1:{listen}")
    assert relay.stop() == 0
    assert "relay.stopped" in relay.text()


def test_a_listen_address_in_use_names_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        profile = relay_profile(tmp_path / "relay.toml", listen=port, ports=[1], metrics=free_port())
        result = run("relay", str(profile), "--status", "off")
    assert result.returncode == 1, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port} (set by groups.primary.encoder.listen)" in result.stderr
