"""The test rig's rules, enforced: no test module imports another (shared helpers live in kits:
``rig.py``, ``conftest.py``, ``faultkit.py`` and the per-folder ``*kit.py``/``opsrig.py``/
``kube.py``/``scenarios.py``), with no exceptions, and ``free_port`` is defined once."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
from rig import wait_until

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def imported_test_modules(path: Path) -> set[str]:
    """The ``test_*`` modules ``path`` imports (``from test_x import ...``, ``from tests.a.test_x import ...``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found.update(name.rsplit(".", 1)[-1] for name in names if name.rsplit(".", 1)[-1].startswith("test_"))
    return found


def test_imports_of_test_modules_are_read_as_such(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("import os\nfrom test_integration import x\nfrom tests.push.test_publisher import DEMO\n"
                       "import test_clock\nfrom rig import free_port\n")  # fmt: skip
    assert imported_test_modules(planted) == {"test_integration", "test_publisher", "test_clock"}


def test_no_test_module_imports_another():
    found = {
        (str(path.relative_to(TESTS)), name)
        for path in sorted(TESTS.rglob("*.py"))  # kits too: a kit importing a test module is the same tie
        for name in imported_test_modules(path)
    }
    assert not found, f"test modules importing test modules (move the helper into a kit): {sorted(found)}"


def defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in ast.walk(tree))


def test_free_port_is_defined_once():
    files = [path for folder in (TESTS, ROOT / "bench") for path in folder.rglob("*.py")]
    assert sorted(str(p.relative_to(ROOT)) for p in files if defines(p, "free_port")) == ["tests/rig.py"]


def test_a_wait_fails_at_once_when_a_watched_process_has_exited(tmp_path, orchestrators):
    """``up`` that cannot start (here: no profile; in the field: a lock held, a port taken) exits
    at once; a wait given its log says so with its exit code and log, long before its timeout."""
    up = orchestrators("up", str(tmp_path / "missing.toml"), log="up.log")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"exited with code 2 after .* waiting for fragments") as failed:
        wait_until(lambda: False, 120, "fragments", [up.log])
    assert time.monotonic() - started < 60
    assert "cannot read the profile" in str(failed.value)  # the log's tail is in the message
    # A process whose end the test has seen is not watched: the wait runs to its own end.
    assert up.process.wait(10) == 2
    with pytest.raises(pytest.fail.Exception, match=r"timed out after 0.5 s waiting for nothing"):
        wait_until(lambda: False, 0.5, "nothing", [up.log])
