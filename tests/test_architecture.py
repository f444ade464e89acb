"""House style, enforced: the pure core never imports I/O; the shells do the I/O."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"
PURE_CORE = [
    "clock",
    "fmp4",
    "fmp4_reader",
    "manifest",
    "stream",
    "outbox",
    "continuity",
    "recut",
    "ffmpeg_command",
    "reconnect",
    "receiver",
    "errors",
]
IO_MODULES = {"trio", "httpx", "httpcore", "hypercorn", "anyio", "subprocess", "socket", "asyncio", "os", "shutil",
              "prometheus_client", "rich", "click", "time", "orchestrator.wallclock"}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_module_imports_no_io(module):
    imported = imported_modules(PACKAGE / f"{module}.py")
    offending = {name for name in imported if name in IO_MODULES or name.split(".")[0] in IO_MODULES}
    assert not offending, f"{module}.py is pure core but imports {sorted(offending)}"


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_module_opens_with_a_theory_of_operation(module):
    docstring = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text())) or ""
    if module == "errors":
        assert "OrchestratorError" in docstring  # the exception tree is drawn at the top instead
    else:
        assert "Theory of operation" in docstring
