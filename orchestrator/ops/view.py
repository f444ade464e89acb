"""The operator's view: per stream, its last index, and per group each endpoint by name and
region with its state, the encoder's restarts, drops and the last error.

Everything here renders the ``/status`` document (:mod:`orchestrator.ops.status`), so the live
table of ``up`` and ``orchestrator status`` (which reads ``/status`` over HTTP) show the same
thing. Ages are computed against the document's own ``time``.

During ``up`` on a terminal it is a live table (rich) redrawn twice a second; log records of
WARNING and above are printed above it (rich's live display keeps the table at the bottom), and
INFO records are kept off the console while the table is shown (``--log-file`` keeps them all;
``--status log`` shows them). Otherwise (a pod's log, a pipe) it is one plain log line per
stream and group every fragment duration, with everything else in the log as usual.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.ops.state import LiveState
from orchestrator.ops.status import status_document

log = logging.getLogger(__name__)

COLOURS = {"streaming": "green", "waiting": "yellow", "reconnecting": "red", "unauthorised": "red bold",
           "not_found": "red bold"}  # fmt: skip


class ConsoleLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The console's log handler: the live table lowers it to WARNING while it is shown."""


def clock(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def endpoint_text(e: dict[str, Any], now: float) -> str:
    """``region-b (us-east): reconnecting since 12:03:04 (40s), backlog 38 s``."""
    state = e["state"]
    text = f"{e['endpoint']} ({e['region']}): {state}"
    if state not in ("streaming", "waiting") and e["since"] is not None:
        text += f" since {clock(e['since'])} ({age(now - e['since'])})"
    if e["backlog_seconds"] >= 1:
        text += f", backlog {e['backlog_seconds']:.0f} s"
    return text


def last_error(group: dict[str, Any], encoder: dict[str, Any] | None, now: float) -> str:
    """The most recent error of the group's endpoints for this stream, or of its encoder."""
    errors = [(e["last_error_at"], f"{e['endpoint']}: {e['last_error']}") for e in group["endpoints"]
              if e["last_error"] and e["last_error_at"] is not None]  # fmt: skip
    if encoder and encoder["last_error"] and encoder["last_error_at"] is not None:
        errors.append((encoder["last_error_at"], f"encoder: {encoder['last_error']}"))
    if not errors:
        return ""
    when, message = max(errors)
    message = " ".join(message.split())
    if len(message) > 60:  # one line: the whole message is in the log and in /status
        message = message[:59] + "…"
    return f"{clock(when)} ({age(now - when)} ago) {message}"


def rows(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per (stream, group), with everything the table and the log line show."""
    now = document["time"]
    for stream in document["streams"]:
        for i, group in enumerate(stream["groups"]):
            encoder = document["groups"].get(group["group"])
            yield {
                "stream": stream["stream"] if i == 0 else "",
                "stream_id": stream["stream"],
                "index": stream["last_index"] if i == 0 else None,
                "first": i == 0,
                "group": group["group"],
                "group_index": group["last_index"],
                "encoder_up": None if encoder is None else encoder["encoder_up"],
                "restarts": 0 if encoder is None else encoder["restarts"],
                "exit_code": None if encoder is None else encoder["last_exit_code"],
                "endpoints": group["endpoints"],
                "dropped": sum(e["dropped"] for e in group["endpoints"]),
                "error": last_error(group, encoder, now),
                "lock": group.get("lock"),
                "content_offset": group.get("content_offset_seconds"),
                "peers": group.get("peers") or [],
            }


def lock_text(row: dict[str, Any]) -> str:
    """``lock=peer,offset=+0.000s``: how the group's content is locked and its content offset;
    for a live lock with peers, ``,backup=ok`` per peer (see :func:`peer_text`)."""
    offset = row["content_offset"]
    text = f"lock={row['lock']}" + ("" if offset is None else f",offset={offset:+.3f}s")
    return text + "".join(f",{peer_text(p)}" for p in row.get("peers") or [])


PEER_WORDS = {"agrees": "ok", "unreachable": "down", "other_timeline": "other", "no_mapping": "none"}


def peer_text(peer: dict[str, Any]) -> str:
    """``backup=ok``, ``backup=+18000t`` (its offset minus ours, 90 kHz ticks), ``backup=other``
    (another source timeline), ``<url>=down``, ``<url>=none`` (answered without a mapping)."""
    word = PEER_WORDS.get(peer["agreement"])
    if word is None:
        word = f"{peer['offset_ticks']:+d}t"
    name = peer["peer"]
    if "://" in name:  # a peer known by its URL only: its host and port keep the column narrow
        name = urlsplit(name).netloc or name
    return f"{name}={word}"


def state_text(e: dict[str, Any], now: float) -> str:
    """``reconnecting since 12:03:04 (40s), backlog 38 s``: the endpoint's state column."""
    return endpoint_text(e, now).split(": ", 1)[1]


def table(document: dict[str, Any], *, caption: str | None = None) -> Table:
    """One line per endpoint, grouped by stream and group; the group's encoder restarts, drops
    and last error on its first line."""
    now = document["time"]
    title = f"orchestrator: {document['presentation']}  {clock(now)} UTC"
    ready = "[green]ready[/]" if document["ready"] else "[red]not ready[/]: " + "; ".join(document["not_ready"])
    out = Table(title=title, caption=caption or ready, expand=False)
    for name in ("stream", "index", "group", "endpoint", "region"):
        out.add_column(name, justify="right" if name == "index" else "left")
    out.add_column("state", min_width=12)
    out.add_column("restarts", justify="right")
    out.add_column("drops", justify="right")
    out.add_column("last error")
    all_rows = list(rows(document))
    for n, row in enumerate(all_rows):
        index = "" if not row["first"] else ("-" if row["index"] is None else str(row["index"]))
        group = Text(row["group"])
        if row["encoder_up"] is False:
            group.append(" encoder down", style="red bold")
        if row["lock"] is not None:
            off = (row["lock"] == "file" and row["content_offset"]) or any(
                p["agreement"] != "agrees" for p in row["peers"]
            )
            group.append(f" {lock_text(row)}", style="yellow" if off else "dim")
        restarts = str(row["restarts"]) + ("" if row["exit_code"] is None else f" (exit {row['exit_code']})")
        drops = Text(str(row["dropped"]), style="red" if row["dropped"] else "")
        endpoints = row["endpoints"] or [None]
        last_of_stream = n + 1 == len(all_rows) or all_rows[n + 1]["first"]
        for j, e in enumerate(endpoints):
            cells: list[str | Text] = [row["stream"], index, group] if j == 0 else ["", "", ""]
            if e is None:
                cells += ["-", "", Text("no endpoint", style="dim")]
            else:
                cells += [e["endpoint"], e["region"], Text(state_text(e, now), style=COLOURS.get(e["state"], ""))]
            cells += [restarts, drops, Text(row["error"])] if j == 0 else ["", "", ""]
            out.add_row(*cells, end_section=last_of_stream and j + 1 == len(endpoints))
    return out


def lines(document: dict[str, Any]) -> list[str]:
    """The same view as plain key=value lines, one per (stream, group), for logs and pipes."""
    now = document["time"]
    out = []
    for row in rows(document):
        parts = [f"stream={row['stream_id']}", f"index={'-' if row['group_index'] is None else row['group_index']}",
                 f"group={row['group']}", f"encoder={'down' if row['encoder_up'] is False else 'up'}"]  # fmt: skip
        for e in row["endpoints"]:
            detail = e["state"]
            if e["state"] not in ("streaming", "waiting") and e["since"] is not None:
                detail += f"_for_{age(now - e['since'])}"
            if e["backlog_seconds"] >= 1:
                detail += f",backlog_{e['backlog_seconds']:.0f}s"
            parts.append(f"{e['endpoint']}/{e['region']}={detail}")
        if row["lock"] is not None:
            parts.append(lock_text(row))
        parts += [f"restarts={row['restarts']}", f"dropped={row['dropped']}"]
        if row["error"]:
            parts.append(f"last_error={row['error']!r}")
        out.append(" ".join(parts))
    return out


@contextmanager
def console_warnings_only() -> Iterator[None]:
    """While the live table is shown, the console log handler passes WARNING and above only."""
    changed = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ConsoleLogHandler) and handler.level < logging.WARNING:
            changed.append((handler, handler.level))
            handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, level in changed:
            handler.setLevel(level)


class StatusView:
    """The view during ``up``: ``mode`` is "live" (a terminal), "log", "off", or "auto"."""

    def __init__(self, running: LiveState, *, interval: float, mode: str = "auto") -> None:
        if mode == "auto":
            mode = "live" if sys.stdout.isatty() else "log"
        self.mode = mode
        self.running = running
        self.interval = interval
        self._stopped = trio.Event()

    def stop(self) -> None:
        self._stopped.set()

    def document(self) -> dict[str, Any]:
        return status_document(self.running, now_wall=time.time(), now_monotonic=trio.current_time())

    async def run(self) -> None:
        """Refresh until ``stop()``. Cancellation: the live table is left as last drawn and the
        console log level restored."""
        if self.mode == "off":
            await self._stopped.wait()
            return
        if self.mode == "live":
            caption = "warnings and errors print above; INFO is in --log-file, or run with --status log"
            with console_warnings_only(), Live(table(self.document()), console=Console(), refresh_per_second=2,
                                               transient=False) as live:  # fmt: skip
                while not self._stopped.is_set():
                    with trio.move_on_after(0.5):
                        await self._stopped.wait()
                    document = self.document()
                    live.update(table(document, caption=None if document["not_ready"] else caption))
            return
        while not self._stopped.is_set():
            with trio.move_on_after(self.interval):
                await self._stopped.wait()
            for line in lines(self.document()):
                log.info("status %s", line)
