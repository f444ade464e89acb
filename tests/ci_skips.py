"""Under ``CI=true`` a skipped test fails the run.

A test that needs a tool (ffmpeg, ffprobe) skips with a reason on a developer's machine that
lacks it; on CI (``.ci/run`` sets ``CI=true`` and installs every tool) the same skip would let a
run pass that proved nothing, so there it is reported as a failure naming the reason. Loaded by
``tests/conftest.py``; expected failures (``xfail``) are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def skips_fail() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not (skips_fail() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which must run every test: {reason}"
