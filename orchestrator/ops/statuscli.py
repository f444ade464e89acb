"""``orchestrator status``: read a running ``up``'s ``/status`` and print the operator's view
(the same table as ``up`` shows), once or until Ctrl-C; the exit code says whether anything is
down, so scripts can use it.

Exit codes: 0 every encoder up and every endpoint streaming; 1 something down (each listed
below the table); 3 the status could not be read (nothing listening, not an orchestrator).

On a terminal the view fits its width (the compact layout when narrow, see
:mod:`orchestrator.ops.view`); piped, or under ``kubectl exec`` without ``-t``, there is no width
to fit, so the full table is printed at its own width (``COLUMNS`` still sets one if given).
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from orchestrator.errors import StatusUnreadable
from orchestrator.ops.status import down
from orchestrator.ops.view import PIPE_MAX_WIDTH, view

OK, DOWN, UNREADABLE = 0, 1, 3


def fetch(client: httpx.Client, url: str) -> dict[str, Any]:
    target = url.rstrip("/") + "/status"
    try:
        response = client.get(target)
    except httpx.HTTPError as exc:
        raise StatusUnreadable(f"cannot read {target}: {exc}") from exc
    if response.status_code != 200:
        raise StatusUnreadable(f"{target} answered HTTP {response.status_code}")
    try:
        document: dict[str, Any] = response.json()
        document["streams"], document["groups"], document["time"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StatusUnreadable(f"{target} is not an orchestrator status document") from exc
    return document


def render(document: dict[str, Any], width: int) -> tuple[Group, int]:
    problems = down(document)
    parts: list[Any] = [view(document, width)]
    if problems:
        parts.append(Text("down:\n" + "\n".join(f"  {p}" for p in problems), style="red"))
    return Group(*parts), DOWN if problems else OK


def output_console() -> Console:
    """The terminal's console; not a terminal and no ``COLUMNS``: one wide enough for the full table."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=PIPE_MAX_WIDTH)
    return console


def show_status(url: str, *, watch: bool = False, interval: float = 2.0, console: Console | None = None) -> int:
    console = console or output_console()
    with httpx.Client(timeout=5.0) as client:
        if not watch:
            try:
                shown, code = render(fetch(client, url), console.width)
            except StatusUnreadable as exc:
                console.print(f"error: {exc}", style="red", highlight=False)
                return UNREADABLE
            console.print(shown)
            return code
        code = UNREADABLE
        with Live(Text(f"reading {url} ..."), console=console, refresh_per_second=4) as live:
            try:
                while True:
                    try:
                        shown, code = render(fetch(client, url), console.width)
                        live.update(shown)
                    except StatusUnreadable as exc:
                        code = UNREADABLE
                        live.update(Text(f"error: {exc}", style="red"))
                    time.sleep(interval)
            except KeyboardInterrupt:
                pass
        return code
