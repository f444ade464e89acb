"""``--help`` with examples for every command, legible at 80 columns; and shell completion as
click generates it: the installed ``orchestrator`` script prints a bash script, which real bash
sources and uses to complete commands and option values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "orchestrator"  # the console script pip installed beside python
COMMANDS = ["up", "relay", "status", "validate", "schema", "ingest"]


def orchestrator(*args: str, env: dict[str, str] | None = None) -> str:
    assert SCRIPT.exists(), f"no {SCRIPT}: pip install -e . installs the console script"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("_ORCHESTRATOR")}
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False,
                            env={**environ, "COLUMNS": "80", **(env or {})})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_main_help_shows_the_demo_a_real_event_and_completion() -> None:
    text = orchestrator("--help")
    assert "orchestrator up profiles/demo.toml --local-ingest demo-archive" in text
    assert "orchestrator up event.toml --group primary      (host A)" in text
    assert "orchestrator up event.toml --group backup       (host B)" in text
    assert 'eval "$(_ORCHESTRATOR_COMPLETE=bash_source orchestrator)"' in text
    assert ". .venv/bin/activate" in text
    assert all(len(line) <= 80 for line in text.splitlines())


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_examples_within_80_columns(command: str) -> None:
    text = orchestrator(command, "--help")
    examples = text[text.index("Example") :]
    assert f"orchestrator {command}" in examples
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_bash_completion_script_completes_commands_and_choices(tmp_path: Path) -> None:
    script = orchestrator(env={"_ORCHESTRATOR_COMPLETE": "bash_source"})
    assert "_orchestrator_completion()" in script
    assert "complete -o nosort -F _orchestrator_completion orchestrator" in script
    bash = shutil.which("bash")
    assert bash is not None
    (tmp_path / "completion.bash").write_text(script)

    def complete(*words: str) -> list[str]:
        """What <TAB> offers after ``words`` (the last one being completed), in real bash."""
        quoted = " ".join(f"'{w}'" for w in words)
        probe = (f'PATH="{SCRIPT.parent}:$PATH"; source "{tmp_path / "completion.bash"}"; '
                 f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _orchestrator_completion orchestrator; "
                 'printf "%s\\n" "${COMPREPLY[@]}"')  # fmt: skip
        result = subprocess.run([bash, "--norc", "-c", probe], capture_output=True, text=True, timeout=60, check=True)
        return result.stdout.split()

    assert complete("orchestrator", "st") == ["status"]
    assert complete("orchestrator", "") == sorted(COMMANDS)
    assert complete("orchestrator", "up", "event.toml", "--status", "") == ["auto", "live", "log", "off"]
    assert "--local-ingest" in complete("orchestrator", "up", "--")
