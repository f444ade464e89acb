"""House style, enforced: the layering between the sub-packages is data, here; the pure core
never imports I/O; there is no import cycle.

Layers, lowest first. ``core`` is the package's top-level foundation (clock, errors, profile,
wall clock); ``app`` is what wires everything together (the supervisor and the CLI).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"

CORE_MODULES = {"clock", "errors", "profile", "tracks", "wallclock", "__init__"}
APP_MODULES = {"cli", "supervisor", "__main__", "gcpacer"}

# Which area may import which (besides itself). Anything not listed is a layering violation.
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "fmp4": {"core"},
    "wire": {"core", "fmp4"},
    "ops": {"core"},
    "push": {"core", "fmp4", "wire", "ops"},
    "encode": {"core", "fmp4", "wire", "ops", "push"},
    "ingest": {"core", "fmp4", "wire", "ops"},
    "relay": {"core", "fmp4", "wire", "ops", "push", "ingest"},
    "testing": {"core"},
    "app": {"core", "fmp4", "wire", "ops", "push", "encode", "ingest", "relay"},
}

# Pure modules: bytes, integers and `now` in, bytes and decisions out.
PURE_CORE = [
    "clock",
    "errors",
    "tracks",
    "fmp4/boxes",
    "fmp4/reader",
    "fmp4/stream",
    "wire/format",
    "wire/smooth",
    "wire/cmaf",
    "push/outbox",
    "push/reconnect",
    "push/lifecycle",
    "push/failures",
    "encode/continuity",
    "encode/recut",
    "encode/lock",
    "encode/ffmpeg_command",
    "ingest/receiver",
    "ingest/cmafpoint",
    "relay/intake",
    "relay/spool",
    "ops/state",
    "ops/status",
    "ops/monitor",
    "testing/bodyscan",
]
IO_MODULES = {"trio", "httpx", "httpcore", "hypercorn", "anyio", "subprocess", "socket", "asyncio", "os", "shutil",
              "prometheus_client", "rich", "click", "time", "orchestrator.wallclock"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, resolved: ``from orchestrator.fmp4 import boxes`` names
    ``orchestrator.fmp4.boxes`` when that is a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if candidate in MODULES:
                    names.add(candidate)
    return names


def area_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if len(parts) == 2 and parts[1] in CORE_MODULES:
        return "core"
    if len(parts) == 2 and parts[1] in APP_MODULES:
        return "app"
    return parts[1]


def test_every_module_belongs_to_a_known_area():
    unknown = {m: area_of(m) for m in MODULES if area_of(m) not in MAY_IMPORT}
    assert not unknown, f"modules in no declared area (add the area to MAY_IMPORT): {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layering(module):
    area = area_of(module)
    allowed = MAY_IMPORT[area] | {area}
    violations = []
    for imported in sorted(imported_modules(MODULES[module])):
        if imported == "orchestrator" or not imported.startswith("orchestrator."):
            continue
        target = area_of(imported)
        if target not in allowed:
            violations.append(f"{imported} ({target})")
    path = MODULES[module].relative_to(PACKAGE.parent)
    assert not violations, f"{path} ({area}) may import only {sorted(allowed)}, but imports {violations}"


def test_no_import_cycle():
    graph = {
        m: {i for i in imported_modules(p) if i in MODULES and i != m and MODULES[i].name != "__init__.py"}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_layering_check_names_the_file_and_the_import(tmp_path, monkeypatch):
    """The check itself: a planted violation is reported with the file and the import."""
    planted = PACKAGE / "fmp4" / "_planted.py"  # relative_to(PACKAGE) must hold for the message
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from orchestrator.push.outbox import Outbox\n")
    monkeypatch.setitem(MODULES, "orchestrator.fmp4.boxes", planted)
    expected = r"orchestrator/fmp4/_planted\.py \(fmp4\).*orchestrator\.push\.outbox \(push\)"
    with pytest.raises(AssertionError, match=expected):
        test_layering("orchestrator.fmp4.boxes")


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_module_imports_no_io(module):
    path = PACKAGE / f"{module}.py"
    imported = imported_modules(path)
    offending = {name for name in imported if name in IO_MODULES or name.split(".")[0] in IO_MODULES}
    assert not offending, f"{module}.py is pure core but imports {sorted(offending)}"


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_module_opens_with_a_theory_of_operation(module):
    docstring = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text())) or ""
    if module == "errors":
        assert "OrchestratorError" in docstring  # the exception tree is drawn at the top instead
    elif module == "ops/state":
        assert "plain data" in docstring  # data types only: nothing to operate
    else:
        assert "Theory of operation" in docstring


@pytest.mark.parametrize("package", ["fmp4", "wire", "encode", "push", "ingest", "ops", "testing"])
def test_sub_package_says_what_lives_there_and_what_it_may_import(package):
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    assert "import" in docstring, f"orchestrator/{package}/__init__.py must say what it may import"


# --- the seams stated one by one (each fails on a planted violation) ------------------------------


def test_push_does_not_import_encode():
    """The push side (publishers, outboxes, the fan-out to endpoints) serves any source of
    fragments (an encoder group today, a relay later): it never imports the encoders."""
    offending = {
        module: sorted(i for i in imported_modules(MODULES[module]) if area_of(i) == "encode")
        for module in MODULES
        if area_of(module) == "push"
    }
    assert not {m: i for m, i in offending.items() if i}, f"push imports encode: {offending}"
    assert "encode" not in MAY_IMPORT["push"]


def test_push_importing_encode_is_reported(monkeypatch):
    """The check itself: a push module that imports the group encoder fails both the layering
    test and the push-does-not-import-encode rule."""
    planted = PACKAGE / "push" / "_planted.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from orchestrator.encode.group import Sink\n")
    monkeypatch.setitem(MODULES, "orchestrator.push._planted", planted)
    with pytest.raises(AssertionError, match=r"push imports encode.*orchestrator\.encode\.group"):
        test_push_does_not_import_encode()
    with pytest.raises(AssertionError, match=r"orchestrator/push/_planted\.py \(push\).*orchestrator\.encode\.group"):
        test_layering("orchestrator.push._planted")


# --- the module table (docs/architecture.md) names every module -------------------------------------

MODULE_TABLE = PACKAGE.parent / "docs" / "architecture.md"
NOT_IN_TABLE = {"__init__.py", "__main__.py"}  # each folder's __init__ says what lives there; __main__ runs cli


def table_rows(readme: str) -> set[str]:
    """The modules named in the first column of the module table (``| `a.py`, `b.py` | pure | ...``)."""
    names: set[str] = set()
    for cell in re.findall(r"^\| ((?:`[\w/]+\.py`(?:, )?)+) \| ?(?:pure|shell)? ?\|", readme, flags=re.MULTILINE):
        names.update(re.findall(r"`([\w/]+\.py)`", cell))
    return names


def table_problems(modules: set[str], readme: str) -> list[str]:
    listed = table_rows(readme)
    missing = [f"{m} has no row in the module table (docs/architecture.md)" for m in sorted(modules - listed)]
    stale = [f"the module table (docs/architecture.md) names {m}, which does not exist"
             for m in sorted(listed - modules)]  # fmt: skip
    return missing + stale


def package_files() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in MODULES.values() if p.name not in NOT_IN_TABLE}


def test_every_module_has_a_row_in_the_module_table():
    assert len(table_rows(MODULE_TABLE.read_text())) > 30
    problems = table_problems(package_files(), MODULE_TABLE.read_text())
    assert not problems, "\n".join(problems)


def test_a_module_missing_from_the_module_table_is_reported():
    readme = MODULE_TABLE.read_text()
    assert table_problems(package_files() | {"wire/_planted.py"}, readme) == [
        "wire/_planted.py has no row in the module table (docs/architecture.md)"
    ]
    assert table_problems(package_files() - {"gcpacer.py"}, readme) == [
        "the module table (docs/architecture.md) names gcpacer.py, which does not exist"
    ]
