"""The command line as an operator runs it: real subprocesses, exit codes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rig import DEMO_BACKUP_ENDPOINTS, demo_profile, free_port

DEMO = Path(__file__).resolve().parent.parent / "profiles" / "demo.toml"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60,
        pre: list[str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The CLI in ``cwd`` (the test's directory: a relative ``[state] dir`` lands there)."""
    return subprocess.run(
        [sys.executable, *(pre or ["-m", "orchestrator"]), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip


# Runs the CLI as if the optional imageio-ffmpeg wheel were not installed.
HIDE_FFMPEG_WHEEL = "import sys; sys.modules['imageio_ffmpeg'] = None; from orchestrator.cli import main; main()"


def write_variant(tmp_path: Path, old: str, new: str) -> Path:
    text = DEMO.read_text()
    assert old in text
    path = tmp_path / "event.toml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_validate_demo_ok(tmp_path):
    result = run("validate", str(DEMO), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: presentation 'demo', 2 streams" in result.stdout


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("bitrate = 800_000", 'bitrate = "fast"',
     'streams[video].tracks[video_360p].bitrate: "fast" is not a bitrate; write bits per second, e.g. 800000'),
    ('language = "eng"', 'language = "eng"\n  colour = "blue"', "streams[audio].tracks[audio_eng].colour: unknown key"),
    ("fragment_duration = 2 ", "fragment_duration = 10 ",
     "presentation.fragment_duration: fragment duration 10 s is outside 2 to 6 s"),
    (DEMO_BACKUP_ENDPOINTS, "", "groups.backup.endpoints: required key is missing"),
])  # fmt: skip
def test_validate_malformed_profile_names_file_key_and_reason(tmp_path, old, new, expected):
    path = write_variant(tmp_path, old, new)
    result = run("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{path}: {expected}" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_missing_file_exits_2(tmp_path):
    result = run("validate", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.toml" in result.stderr
    assert "cannot read the profile" in result.stderr


def test_schema_is_json_schema(tmp_path):
    result = run("schema", cwd=tmp_path)
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert set(schema["required"]) >= {"presentation", "streams", "groups"}


def test_up_with_missing_secret_fails_before_going_live(tmp_path):
    path = write_variant(tmp_path, 'url = "http://127.0.0.1:18082/live/demo.isml"\n',
                         'url = "http://127.0.0.1:18082/live/demo.isml"\n'
                         '  credentials = { username = "enc", password_env = "ORCH_TEST_UNSET_SECRET" }\n')  # fmt: skip
    env = {"ORCH_TEST_UNSET_SECRET": ""}
    result = run("up", str(path), "--duration", "1", "--status", "off", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert ("groups.primary.endpoints[region-b].credentials: environment variable ORCH_TEST_UNSET_SECRET"
            in result.stderr)  # fmt: skip


def test_up_local_ingest_refuses_remote_endpoints(tmp_path):
    path = write_variant(tmp_path, "http://127.0.0.1:18081/live/demo.isml", "https://ingest.example.net/live/demo.isml")
    result = run("up", str(path), "--local-ingest", str(tmp_path / "archive"), "--duration", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "groups.primary.endpoints[region-a].url: --local-ingest serves loopback endpoints only" in result.stderr


def test_up_unknown_group(tmp_path):
    result = run("up", str(DEMO), "--group", "tertiary", "--duration", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "no group named tertiary" in result.stderr


def test_port_in_use_is_a_clear_error_not_a_traceback(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_variant(tmp_path, 'listen = "127.0.0.1:9464"', f'listen = "127.0.0.1:{port}"')
        result = run("up", str(path), "--duration", "1", "--status", "off", cwd=tmp_path)
        assert result.returncode == 1
        assert "error: " in result.stderr
        assert "Address already in use" in result.stderr
        assert "Traceback" not in result.stderr
        result = run("ingest", "--listen", f"127.0.0.1:{port}", "--archive", str(tmp_path / "a"), cwd=tmp_path)
        assert result.returncode == 1
        assert "Address already in use" in result.stderr
        assert "Traceback" not in result.stderr


def test_up_with_no_ffmpeg_and_no_fallback_says_how_to_get_it(tmp_path):
    path = write_variant(tmp_path, ', fallback = "synthetic" }', " }")
    empty = tmp_path / "bin"
    empty.mkdir()
    # No ffmpeg on PATH (python itself is run by its full path); the optional wheel hidden too.
    result = run("up", str(path), "--duration", "1", env={"PATH": str(empty)},
                 pre=["-c", HIDE_FFMPEG_WHEEL], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "event.toml: groups.primary.encoder: no ffmpeg found on PATH; install ffmpeg" in result.stderr
    assert "pip install 'orchestrator[ffmpeg]'" in result.stderr


def test_up_with_a_wrong_ffmpeg_path_names_it(tmp_path):
    path = write_variant(tmp_path, ', fallback = "synthetic" }', ', path = "/nonexistent/ffmpeg" }')
    result = run("up", str(path), "--duration", "1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "groups.primary.encoder: /nonexistent/ffmpeg is not an executable file" in result.stderr


def test_demo_without_ffmpeg_falls_back_to_the_synthetic_encoder_and_says_so(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    # The demo as shipped, on free ports (the demo itself may be running in this checkout).
    demo = demo_profile(tmp_path / "demo.toml", (free_port(), free_port()), metrics=f"127.0.0.1:{free_port()}",
                        state_dir=Path("demo-state"), encoder="demo")  # fmt: skip
    result = run("up", str(demo), "--local-ingest", str(tmp_path / "archive"), "--duration", "3", "--status", "off",
                 env={"PATH": str(empty)}, pre=["-c", HIDE_FFMPEG_WHEEL], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "supervisor.ffmpeg.missing group=primary fallback=synthetic" in result.stderr
    assert "apt-get install ffmpeg" in result.stderr
    assert "encoder.started group=primary" in result.stderr


@pytest.mark.skipif(subprocess.run(["which", "ffprobe"], capture_output=True).returncode != 0,
                    reason="needs ffmpeg and ffprobe: apt-get install ffmpeg (see README)")  # fmt: skip
def test_validate_probes_a_file_source_and_names_the_key_when_it_cannot_be_locked(tmp_path):
    silent = tmp_path / "silent.mp4"  # video only: the demo presentation has an audio track
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i", "testsrc2=size=64x36:rate=25",
                    "-t", "1", "-c:v", "libx264", "-preset", "ultrafast", str(silent)], check=True)  # fmt: skip
    old = 'encoder = { backend = "ffmpeg", source = { kind = "testpattern" }'
    path = write_variant(
        tmp_path, old, f'encoder = {{ backend = "ffmpeg", source = {{ kind = "file", path = "{silent}" }}'
    )
    result = run("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"event.toml: groups.primary.encoder.source.path: {silent}: the file has no audio stream" in result.stderr
