"""The CI rule, run in a child pytest: a skip passes on a developer's machine, fails under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SAMPLE = """
import pytest

@pytest.mark.skipif(True, reason="needs a tool that is not installed")
def test_needs_a_tool():
    pass

def test_plain():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    assert False
"""


@pytest.mark.parametrize(("ci", "code"), [("", 0), ("true", 1)])
def test_a_skip_fails_the_run_only_under_ci_true(tmp_path, ci, code):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(TESTS)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider", "-q",
                             "-rA", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == code, result.stdout
    if ci:
        # A skip decided at setup (skipif) is reported as an error of the setup phase.
        assert "1 passed, 1 xfailed, 1 error" in result.stdout
        assert "skipped under CI=true, which must run every test: Skipped: needs a tool that is not installed" in (
            result.stdout
        )
    else:
        assert "1 passed, 1 skipped, 1 xfailed" in result.stdout
