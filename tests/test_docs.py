"""The README stays a front door whose commands are CI's, its links land on pages and sections that
exist, the generated profile reference covers every key of the profile models, and the generated
CLI reference is what each command's --help prints.

The site itself is built by ``mkdocs build --strict`` in .ci/run (broken links and anchors fail
it); these checks need no MkDocs, so they run with the test extra alone.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import typing
import unicodedata
from pathlib import Path
from types import ModuleType
from typing import Any

import click
from pydantic import BaseModel

from orchestrator.cli import main
from orchestrator.profile import Profile, json_schema

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the README ---------------------------------------------------------------------------------------


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the detail into docs/"


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# The README's test command, exactly:") + 1]
    assert command in README.read_text().splitlines()


def test_the_readme_demo_command_runs_the_demo_profile():
    demo = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/orchestrator up profiles/demo.toml --local-ingest demo-archive"  # noqa: E501
    assert demo in README.read_text().splitlines()
    assert (ROOT / "profiles" / "demo.toml").is_file()


def slug(title: str) -> str:
    """Python-Markdown's toc slug (MkDocs' default), or the heading's explicit ``{#id}``."""
    if explicit := re.search(r"\{#([\w-]+)\}\s*$", title):
        return explicit.group(1)
    text = unicodedata.normalize("NFKD", re.sub(r"`", "", title)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def links(markdown: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_readme_link_lands_on_a_page_and_section_that_exist():
    readme = README.read_text()
    found = links(readme)
    assert len(found) > 20
    problems = []
    for link in found:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = README if not path else (ROOT / path)
        if not target.is_file():
            problems.append(f"{link}: no file {path}")
        elif anchor and anchor not in anchors(target.read_text()):
            problems.append(f"{link}: {path or 'README.md'} has no section #{anchor}")
    assert not problems, "\n".join(problems)


def test_a_broken_readme_link_is_noticed():
    assert "shell-completion" in anchors((DOCS / "getting-started.md").read_text())
    assert "shell-completions" not in anchors((DOCS / "getting-started.md").read_text())
    assert slug("What `validate` refuses") == "what-validate-refuses"
    assert slug("Encoder CPU: `bench/encoder_cpu.py` {#encoder-cpu}") == "encoder-cpu"


# --- the generated profile reference -----------------------------------------------------------------


def models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every pydantic model reachable from ``root`` through its fields' annotations."""
    seen: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.append(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for argument in typing.get_args(annotation):
            visit(argument)

    visit(root)
    return seen


def sections(reference: str) -> list[list[str]]:
    """The keys of each section's table, in order."""
    return [re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE) for section in reference.split("\n## ")]


def uncovered(reference: str) -> list[str]:
    tables = sections(reference)
    return [f"{model.__name__}: {list(model.model_fields)}" for model in models(Profile)
            if list(model.model_fields) not in tables]  # fmt: skip


def test_the_profile_reference_has_a_table_for_every_model_with_every_key():
    reference = hooks().profile_reference(json_schema())
    assert len(models(Profile)) >= 15
    assert not uncovered(reference), "models whose keys the reference misses:\n" + "\n".join(uncovered(reference))


def test_a_key_the_reference_misses_is_noticed():
    schema = json_schema()
    del schema["$defs"]["BacklogBound"]["properties"]["bytes"]
    assert uncovered(hooks().profile_reference(schema)) == ["BacklogBound: ['seconds', 'bytes']"]


def test_the_reference_shows_types_limits_and_defaults_from_the_schema():
    reference = hooks().profile_reference(json_schema())
    assert "## `[[groups.<name>.endpoints]]` {#groups-name-endpoints}" in reference
    assert "| `stall_fragments` | integer ≥ 2, ≤ 30 | `3` |" in reference
    assert '| `format` | `"smooth"` or `"cmaf"` | `"smooth"` |' in reference
    assert "| `epoch` | RFC 3339 date-time | required |" in reference
    assert "&lt;stream&gt;" in reference  # a description's <stream> is text, not an HTML tag


def test_the_reference_page_keeps_the_marker_the_hook_replaces():
    page = (DOCS / hooks().PAGE).read_text()
    assert page.count(hooks().MARKER) == 1


# --- the generated CLI reference ---------------------------------------------------------------------


def command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            paths += command_paths(sub, (*path, name))
    return paths


def test_the_cli_reference_is_each_commands_help_as_a_terminal_prints_it():
    reference = hooks().cli_reference(main)
    executable = Path(sys.executable).parent / "orchestrator"  # the installed entry point
    paths = command_paths(main)
    assert len(paths) >= 6
    for path in paths:
        printed = subprocess.run([executable, *path, "--help"], capture_output=True, text=True, check=True, timeout=60,
                                 env={**os.environ, "COLUMNS": "120"}).stdout  # fmt: skip
        assert f"```text\n{printed}" in reference, f"orchestrator {' '.join(path)} --help differs from the page"
        assert f"`{' '.join(('orchestrator', *path))}`" in reference


def test_the_cli_reference_page_keeps_the_marker_the_hook_replaces():
    page = (DOCS / hooks().CLI_PAGE).read_text()
    assert page.count(hooks().CLI_MARKER) == 1
