"""MkDocs hooks for the documentation site (mkdocs.yml: ``hooks``): the two generated references.

The profile reference is generated at build time from the profile's JSON Schema
(``orchestrator.profile.json_schema()``, the same document ``orchestrator schema`` prints), so the
page cannot drift from the pydantic models: a key added, renamed or constrained differently in
``orchestrator/profile.py`` changes the page on the next build. The CLI reference is each click
command's own ``--help`` text (``orchestrator.cli.main`` walked), verbatim in a code block, so the
page shows exactly what a terminal shows, examples and line breaks included. Each page
(``docs/profile-reference.md``, ``docs/cli-reference.md``) holds the hand-written introduction and
the marker the generated text replaces; a page without its marker fails the build rather than
silently showing nothing.

The generators are plain Python (no MkDocs import), so ``tests/test_docs.py`` checks them without
the docs extra installed.
"""

from __future__ import annotations

import json
from typing import Any

MARKER = "<!-- generated: profile reference -->"
PAGE = "profile-reference.md"
CLI_MARKER = "<!-- generated: cli reference -->"
CLI_PAGE = "cli-reference.md"
HELP_WIDTH = 78  # click wraps --help to the terminal's width less 2, at most 80 - 2: any terminal of 80+ columns

Schema = dict[str, Any]


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _code(text: object) -> str:
    return f"`{text}`"


def _literal(value: object) -> str:
    return _code(json.dumps(value))


def _prose(text: str) -> str:
    """A docstring or description as one Markdown line: ``rst literals`` become code spans, and
    outside them ``<`` ``>`` ``&`` are escaped (``<stream>`` is not an HTML tag) and ``|`` too
    (it would end a table cell)."""
    parts = " ".join(text.split()).replace("``", "`").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(parts)


class _Writer:
    """Walks the schema from the root object, one section per TOML table (or inline table)."""

    def __init__(self, schema: Schema) -> None:
        self.defs: dict[str, Schema] = schema.get("$defs", {})
        self.root = schema
        self.sections: list[str] = []
        self.anchor_of: dict[str, str] = {}  # definition name -> anchor of its section
        self.queue: list[tuple[str, str, Schema, str | None, str | None]] = []  # sections planned, not written

    # --- anchors and key paths --------------------------------------------------------------------

    @staticmethod
    def anchor(path: str, variant: str | None) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in path.replace("<name>", "name"))
        slug = "-".join(part for part in slug.split("-") if part)
        return f"{slug}-{variant}" if variant else slug

    def plan(self, path: str, schema: Schema, variant: str | None = None, *, array: bool = False,
             label: str | None = None) -> str:  # fmt: skip
        """Plan a section for an object schema (a $ref or inline) and return its anchor."""
        name = _ref_name(schema["$ref"]) if "$ref" in schema else f"{path}:{variant}"
        if name not in self.anchor_of:
            self.anchor_of[name] = self.anchor(path, variant)
            header = f"[[{path}]]" if array else f"[{path}]"
            self.queue.append((path, header, self.resolve(schema), variant, label))
        return self.anchor_of[name]

    def resolve(self, schema: Schema) -> Schema:
        return self.defs[_ref_name(schema["$ref"])] if "$ref" in schema else schema

    # --- types --------------------------------------------------------------------------------------

    def describe_type(self, path: str, schema: Schema, *, array: bool = False) -> str:
        """A value's type, with its constraints, as Markdown; object types link to their section."""
        if "$ref" in schema and self.resolve(schema).get("type") == "object":
            header = f"[[{path}]]" if array else f"[{path}]"
            return f"table [{_code(header)}](#{self.plan(path, schema, array=array)})"
        if "oneOf" in schema:
            key = schema.get("discriminator", {}).get("propertyName")
            links = []
            for option in schema["oneOf"]:
                target = self.resolve(option)
                tag = str(target["properties"][key]["const"]) if key else str(target.get("title", ""))
                label = _code(f"{key} = {json.dumps(tag)}") if key else tag
                links.append(f"[{label}](#{self.plan(path, option, tag, array=array, label=label)})")
            return "a table, one of " + ", ".join(links)
        if "anyOf" in schema:
            options = [o for o in schema["anyOf"] if o.get("type") != "null"]
            return " or ".join(self.describe_type(path, o, array=array) for o in options)
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            return " or ".join(_literal(v) for v in schema["enum"])
        kind = schema.get("type")
        if kind == "array":
            text = "array of " + self.describe_type(path, schema.get("items", {}), array=True)
            if "minItems" in schema:
                text += f", at least {schema['minItems']}"
            return text
        if kind == "object":
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                child = f"{path}.<name>"
                return f"tables by name, [{_code(f'[{child}]')}](#{self.plan(child, extra)})"
            return "table"
        text = str(kind)
        if schema.get("format") == "date-time":
            text = "RFC 3339 date-time"
        elif schema.get("format") == "path":
            text = "path"
        limits = []
        if "minimum" in schema:
            limits.append(f"≥ {schema['minimum']}")
        if "exclusiveMinimum" in schema:
            limits.append(f"> {schema['exclusiveMinimum']}")
        if "maximum" in schema:
            limits.append(f"≤ {schema['maximum']}")
        if "exclusiveMaximum" in schema:
            limits.append(f"< {schema['exclusiveMaximum']}")
        if limits:
            text += " " + ", ".join(limits)
        if "pattern" in schema:
            text += f" matching {_code(schema['pattern'])}"
        return text

    # --- sections -----------------------------------------------------------------------------------

    def section(self, path: str, header: str, schema: Schema, variant: str | None, label: str | None) -> str:
        title = (_code(header) if path else header) + (f" with {label or _code(variant)}" if variant else "")
        anchor = self.anchor(path, variant) if path else "top-level-tables"
        lines = [f"## {title} {{#{anchor}}}", ""]
        if description := schema.get("description"):
            lines += [_prose(description), ""]
        required = set(schema.get("required", []))
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, prop in schema.get("properties", {}).items():
            kind = self.describe_type(f"{path}.{key}" if path else key, prop)
            if key in required:
                default = "required"
            elif "default" in prop and not isinstance(prop["default"], dict):
                default = "none" if prop["default"] is None else _literal(prop["default"])
            else:
                default = "its table's defaults"
            note = _prose(str(prop.get("description", "")))
            lines.append(f"| {_code(key)} | {kind} | {default} | {note} |".replace("\n", " "))
        if schema.get("additionalProperties") is False:
            lines += ["", "Any other key is an error."]
        return "\n".join(lines)

    def write(self) -> str:
        """Depth first: each table's section is followed by the sections of the tables it holds."""
        pending = [("", "Top level", self.root, None, None)]
        while pending:
            self.queue = []
            self.sections.append(self.section(*pending.pop(0)))
            pending[:0] = self.queue
        return "\n\n".join(self.sections) + "\n"


def profile_reference(schema: Schema) -> str:
    """The reference of every key of a profile, as Markdown, from the profile's JSON Schema."""
    return _Writer(schema).write()


def cli_reference(command: Any, name: str = "orchestrator", parent: Any = None) -> str:
    """Every command's ``--help`` text, as Markdown: one section per command, depth first.

    ``command`` is a click command or group (``orchestrator.cli.main``)."""
    import click

    # make_context applies the command's context_settings (the group's -h), as the real CLI does.
    context = command.make_context(name, [], parent=parent, resilient_parsing=True, terminal_width=HELP_WIDTH)
    level = "##" if parent is None else "###"
    text = f"{level} `{context.command_path}` {{#{context.command_path.replace(' ', '-')}}}\n\n"
    text += f"```text\n{command.get_help(context)}\n```\n"
    if isinstance(command, click.Group):
        for sub in command.list_commands(context):
            text += "\n" + cli_reference(command.get_command(context, sub), sub, context)
    return text


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: put the generated references in place of the markers on their pages."""
    from mkdocs.exceptions import PluginError

    if page.file.src_uri == CLI_PAGE:
        from orchestrator.cli import main

        if CLI_MARKER not in markdown:
            raise PluginError(f"docs/{CLI_PAGE} lost its marker {CLI_MARKER!r}")
        return markdown.replace(CLI_MARKER, cli_reference(main))
    if page.file.src_uri != PAGE:
        return markdown
    from orchestrator.profile import json_schema

    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its marker {MARKER!r}: the generated reference has nowhere to go")
    return markdown.replace(MARKER, profile_reference(json_schema()))
