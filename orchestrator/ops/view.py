"""The operator's view: per stream, its last index and that fragment's shared-clock time, and per
group each endpoint by name and region with its state, the encoder's restarts, drops and the last
error.

Everything here renders the ``/status`` document (:mod:`orchestrator.ops.status`), so the live
table of ``up`` and ``orchestrator status`` (which reads ``/status`` over HTTP) show the same
thing. Ages are computed against the document's own ``time``.

Two layouts, chosen by the width there is (:func:`view`): the full table when it fits on one line
per endpoint, and otherwise a compact one (80 columns: an 80x24 terminal) with one line per
endpoint, where endpoint names are never cut (two endpoints whose names share a prefix stay
apart), the region and the state give way first, and the restarts, the content lock and the last
error of each group move to a line of their own under the table. Output that is not a terminal
(a pipe, ``kubectl exec`` without ``-t``) gets the full table at its own width.

During ``up`` on a terminal it is a live table (rich) redrawn twice a second; log records of
WARNING and above are printed above it (rich's live display keeps the table at the bottom), and
INFO records are kept off the console while the table is shown and until ``up`` ends
(``--log-file`` keeps them all; ``--status log`` shows them); the footer says which. On a stop the
last frame says "stopping", then "stopped", and a summary follows: the fragments pushed per
endpoint and where the archive and the state are. Otherwise (a pod's log, a pipe) it is one plain
log line per stream and group every fragment duration, and the summary as log lines.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import trio
from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.ops.state import LiveState
from orchestrator.ops.status import status_document

log = logging.getLogger(__name__)

COLOURS = {"streaming": "green", "waiting": "yellow", "reconnecting": "red", "unauthorised": "red bold",
           "not_found": "red bold", "stopped": "dim"}  # fmt: skip
ERROR_MIN_WIDTH = 30  # the full table is drawn only if its "last error" column gets at least this
STATE_MIN_WIDTH = 16  # the compact layout drops the region column rather than cut the state shorter
PIPE_MAX_WIDTH = 400  # output that is not a terminal: the full table, at most this wide


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


def index_clock(stream: dict[str, Any]) -> str:
    """``08:00:00``: the shared-clock time (UTC) at which the stream's last fragment starts."""
    stamp: str | None = stream.get("last_index_time")
    return "-" if not stamp else stamp[11:19]


def endpoint_text(e: dict[str, Any], now: float) -> str:
    """``region-b (us-east): reconnecting since 12:03:04 (40s), backlog 38 s``."""
    state = e["state"]
    text = f"{e['endpoint']} ({e['region']}): {state}"
    if state not in ("streaming", "waiting") and e["since"] is not None:
        text += f" since {clock(e['since'])} ({age(now - e['since'])})"
    if e["backlog_seconds"] >= 1:
        text += f", backlog {e['backlog_seconds']:.0f} s"
    return text


def short_state_text(e: dict[str, Any], now: float) -> str:
    """``reconnecting 40s, backlog 38s``: the compact layout's state column."""
    text = str(e["state"])
    if e["state"] not in ("streaming", "waiting") and e["since"] is not None:
        text += f" {age(now - e['since'])}"
    if e["backlog_seconds"] >= 1:
        text += f", backlog {e['backlog_seconds']:.0f}s"
    return text


def latest_error(group: dict[str, Any], encoder: dict[str, Any] | None) -> tuple[float, str] | None:
    """(when, ``who: message``): the most recent error of the group's endpoints for this stream,
    or of its encoder; the message on one line."""
    errors = [(e["last_error_at"], f"{e['endpoint']}: {e['last_error']}") for e in group["endpoints"]
              if e["last_error"] and e["last_error_at"] is not None]  # fmt: skip
    if encoder and encoder["last_error"] and encoder["last_error_at"] is not None:
        errors.append((encoder["last_error_at"], f"encoder: {encoder['last_error']}"))
    if not errors:
        return None
    when, message = max(errors)
    return when, " ".join(message.split())


def error_text(error: tuple[float, str] | None, now: float, limit: int | None = 60) -> str:
    """``07:59:58 (2s ago) region-b: connection failed``, cut to ``limit`` characters of message
    (the whole message is in the log and in /status)."""
    if error is None:
        return ""
    when, message = error
    if limit is not None and len(message) > limit:
        message = message[: limit - 1] + "…"
    return f"{clock(when)} ({age(now - when)} ago) {message}"


def last_error(group: dict[str, Any], encoder: dict[str, Any] | None, now: float) -> str:
    """The most recent error of the group's endpoints for this stream, or of its encoder."""
    return error_text(latest_error(group, encoder), now)


def rows(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per (stream, group), with everything the table and the log line show."""
    now = document["time"]
    for stream in document["streams"]:
        for i, group in enumerate(stream["groups"]):
            encoder = document["groups"].get(group["group"])
            error = latest_error(group, encoder)
            yield {
                "stream": stream["stream"] if i == 0 else "",
                "stream_id": stream["stream"],
                "index": stream["last_index"] if i == 0 else None,
                "clock": index_clock(stream) if i == 0 else "",
                "first": i == 0,
                "group": group["group"],
                "group_index": group["last_index"],
                "encoder_up": None if encoder is None else encoder["encoder_up"],
                "restarts": 0 if encoder is None else encoder["restarts"],
                "exit_code": None if encoder is None else encoder["last_exit_code"],
                "endpoints": group["endpoints"],
                "dropped": sum(e["dropped"] for e in group["endpoints"]),
                "error": error_text(error, now),
                "error_at": None if error is None else error[0],
                "error_message": None if error is None else error[1],
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


def lock_style(row: dict[str, Any]) -> str:
    """Yellow when the content is off: a file source's measured offset, or a peer that disagrees."""
    off = (row["lock"] == "file" and row["content_offset"]) or any(
        p["agreement"] != "agrees" for p in row.get("peers") or []
    )
    return "yellow" if off else "dim"


def state_text(e: dict[str, Any], now: float) -> str:
    """``reconnecting since 12:03:04 (40s), backlog 38 s``: the endpoint's state column."""
    return endpoint_text(e, now).split(": ", 1)[1]


def _state_cell(e: dict[str, Any], now: float, *, final: bool, short: bool) -> Text:
    if final:  # the fragments pushed are in the summary that follows
        return Text("stopped", style=COLOURS["stopped"])
    text = short_state_text(e, now) if short else state_text(e, now)
    return Text(text, style=COLOURS.get(e["state"], ""))


def status_text(document: dict[str, Any], *, final: bool = False) -> Text:
    """``ready``, ``not ready: <reasons>``, ``stopping: ...`` or ``stopped``."""
    if final:
        return Text("stopped", style="bold")
    if document.get("stopping"):
        return Text("stopping: sending the last fragments", style="yellow")
    if document["ready"]:
        return Text("ready", style="green")
    return Text("not ready: " + "; ".join(document["not_ready"]), style="red")


def headline(document: dict[str, Any], *, final: bool = False) -> Text:
    """``orchestrator: demo  08:00:00 UTC  ready`` (or stopping, stopped, not ready)."""
    out = Text(f"orchestrator: {document['presentation']}  {clock(document['time'])} UTC  ", style="bold")
    out.append_text(status_text(document, final=final))
    return out


def _group_cell(row: dict[str, Any], *, final: bool, stopping: bool, lock: bool) -> Text:
    group = Text(row["group"])
    if row["encoder_up"] is False and not final and not stopping:
        group.append(" encoder down" if lock else " down", style="red bold")
    if lock and row["lock"] is not None:
        group.append(f" {lock_text(row)}", style=lock_style(row))
    return group


def table(document: dict[str, Any], *, caption: str | None = None, final: bool = False) -> Table:
    """The full layout: one line per endpoint, grouped by stream and group; the group's encoder
    restarts, drops and last error on its first line."""
    now = document["time"]
    title = f"orchestrator: {document['presentation']}  {clock(now)} UTC"
    stopping = bool(document.get("stopping"))
    status = status_text(document, final=final)
    if caption and document["ready"] and not stopping and not final:
        status = Text(caption)
    out = Table(title=title, caption=status, expand=False)
    for name in ("stream", "index", "clock", "group", "endpoint", "region"):
        out.add_column(name, justify="right" if name == "index" else "left", no_wrap=name != "region")
    out.add_column("state", min_width=12)
    out.add_column("restarts", justify="right", no_wrap=True)
    out.add_column("drops", justify="right", no_wrap=True)
    out.add_column("last error")
    all_rows = list(rows(document))
    for n, row in enumerate(all_rows):
        index = "" if not row["first"] else ("-" if row["index"] is None else str(row["index"]))
        group = _group_cell(row, final=final, stopping=stopping, lock=True)
        restarts = str(row["restarts"]) + ("" if row["exit_code"] is None else f" (exit {row['exit_code']})")
        drops = Text(str(row["dropped"]), style="red" if row["dropped"] else "")
        endpoints = row["endpoints"] or [None]
        last_of_stream = n + 1 == len(all_rows) or all_rows[n + 1]["first"]
        for j, e in enumerate(endpoints):
            cells: list[str | Text] = [row["stream"], index, row["clock"], group] if j == 0 else ["", "", "", ""]
            if e is None:
                cells += ["-", "", Text("no endpoint", style="dim")]
            else:
                cells += [e["endpoint"], e["region"], _state_cell(e, now, final=final, short=False)]
            cells += [restarts, drops, Text(row["error"])] if j == 0 else ["", "", ""]
            out.add_row(*cells, end_section=last_of_stream and j + 1 == len(endpoints))
    return out


def table_width(document: dict[str, Any], *, caption: str | None = None, final: bool = False) -> int:
    """The width the full table needs to give every cell but the last error one line, and the
    last error at least :data:`ERROR_MIN_WIDTH` columns (or its whole text, if shorter)."""
    full = table(document, caption=caption, final=final)
    full.columns[-1].max_width = ERROR_MIN_WIDTH
    console = Console(width=PIPE_MAX_WIDTH * 4, file=io.StringIO(), color_system=None)
    return console.measure(full).maximum


def compact(document: dict[str, Any], width: int, *, footer: str | None = None, final: bool = False) -> Group:
    """The narrow layout (an 80x24 terminal): the headline, one line per endpoint (stream, index,
    clock, group, endpoint, region, state, drops) and a line per group for its restarts, lock
    and last error. Endpoint names are never cut; the region goes when it does not fit, and the
    state gives way (with an ellipsis) to what is left."""
    now = document["time"]
    stopping = bool(document.get("stopping"))
    all_rows = list(rows(document))
    body: list[list[Text]] = []
    for row in all_rows:
        index = "" if not row["first"] else ("-" if row["index"] is None else str(row["index"]))
        group = _group_cell(row, final=final, stopping=stopping, lock=False)
        for j, e in enumerate(row["endpoints"] or [None]):
            head = [Text(row["stream"]), Text(index), Text(row["clock"]), group] if j == 0 else [Text("")] * 4
            if e is None:
                tail = [Text("-"), Text(""), Text("no endpoint", style="dim"), Text("")]
            else:
                drops = Text(str(e["dropped"]), style="red" if e["dropped"] else "")
                tail = [Text(e["endpoint"]), Text(e["region"]), _state_cell(e, now, final=final, short=True), drops]
            body.append(head + tail)
    names = ["stream", "index", "clock", "group", "endpoint", "region", "state", "drops"]
    natural = [max([cell_len(name)] + [r[i].cell_len for r in body]) for i, name in enumerate(names)]
    gap = 2  # between columns: one padding and one blank divider
    fixed = sum(natural[:5]) + natural[7] + gap * 6  # every column but region and state
    show_region = fixed + natural[5] + gap + min(natural[6], STATE_MIN_WIDTH) <= width
    state_width = max(8, width - fixed - (natural[5] + gap if show_region else 0))
    out = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), expand=False)
    for i, name in enumerate(names):
        if name == "region" and not show_region:
            continue
        if name == "state":
            out.add_column(name, no_wrap=True, overflow="ellipsis", width=min(natural[6], state_width))
        else:
            out.add_column(name, no_wrap=True, justify="right" if name in ("index", "drops") else "left",
                           min_width=natural[i])  # fmt: skip
    for cells in body:
        out.add_row(*[c for i, c in enumerate(cells) if show_region or i != 5])
    parts: list[RenderableType] = [_cut(headline(document, final=final), width), out]
    parts += [_cut(line, width) for line in group_notes(all_rows, now)]
    if footer:
        parts.append(_cut(Text(footer, style="dim"), width))
    return Group(*parts)


def _cut(text: Text, width: int) -> Text:
    """One line of at most ``width`` cells, ending in an ellipsis if cut."""
    text.no_wrap = True
    text.overflow = "ellipsis"
    text.truncate(width, overflow="ellipsis")
    return text


def group_notes(all_rows: list[dict[str, Any]], now: float) -> list[Text]:
    """Per group, what the compact table has no column for: ``primary: 3 restarts (last exit 1),
    lock=pattern`` (the lock once if every stream shares it, else per stream), and on a line of
    its own ``primary: last error 07:59:59 (1s ago) encoder: exited ...``."""
    out = []
    for name in dict.fromkeys(row["group"] for row in all_rows):
        mine = [row for row in all_rows if row["group"] == name]
        parts: list[Text] = []
        restarts, code = mine[0]["restarts"], mine[0]["exit_code"]
        if restarts or code is not None:
            parts.append(Text(f"{restarts} restart{'' if restarts == 1 else 's'}"
                              + ("" if code is None else f" (last exit {code})")))  # fmt: skip
        locks = {(row["lock"], row["content_offset"]) for row in mine if row["lock"] is not None}
        if len(locks) == 1:
            row = next(row for row in mine if row["lock"] is not None)
            parts.append(Text(lock_text(row), style=lock_style(row)))
        else:
            parts += [Text(f"{row['stream_id']} {lock_text(row)}", style=lock_style(row)) for row in mine
                      if row["lock"] is not None]  # fmt: skip
        if parts:
            line = Text(f"{name}: ", style="bold")
            line.append_text(Text(", ").join(parts))
            out.append(line)
        errors = [(row["error_at"], row["error_message"]) for row in mine if row["error_at"] is not None]
        if errors:  # a line of its own: as much of the message as the width allows
            line = Text(f"{name}: ", style="bold")
            line.append("last error " + error_text(max(errors), now, limit=None), style="red")
            out.append(line)
    return out


def view(document: dict[str, Any], width: int, *, footer: str | None = None, final: bool = False) -> RenderableType:
    """The full table if it fits in ``width`` columns, else the compact layout."""
    if table_width(document, caption=footer, final=final) <= width:
        return table(document, caption=footer, final=final)
    return compact(document, width, footer=footer, final=final)


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


def summary(document: dict[str, Any], live: LiveState) -> list[str]:
    """What a stopped ``up`` did: how long it ran, the fragments pushed per endpoint (per stream),
    and where the archive (``--local-ingest``) and the state are."""
    now = document["time"]
    ran = "" if live.started_wall is None else f" after {age(now - live.started_wall)}"
    out = [f"stopped at {clock(now)} UTC{ran}; fragments pushed:"]
    pushed: dict[tuple[str, str, str], list[str]] = {}
    for stream in document["streams"]:
        for group in stream["groups"]:
            for e in group["endpoints"]:
                key = (group["group"], e["endpoint"], e["region"])
                pushed.setdefault(key, []).append(f"{stream['stream']} {e['pushed']}")
    for (group_name, endpoint, region), counts in pushed.items():
        out.append(f"  {group_name} -> {endpoint} ({region}): {', '.join(counts)}")
    if not pushed:
        out.append("  none (no endpoint)")
    if live.archives:
        out.append("archive (one fragmented MP4 per track):")
        out += [f"  {archive}" for archive in live.archives]
    if live.state_dir is not None:
        out.append(f"state, where the next up continues the timeline: {live.state_dir}")
    return out


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory if it is under it (as it was most likely given)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def footer_text() -> str:
    """The live table's footer, true to how logging was set up: where INFO goes, if anywhere."""
    root = logging.getLogger()
    files = [_shown_path(h.baseFilename) for h in root.handlers if isinstance(h, logging.FileHandler)]
    if root.getEffectiveLevel() > logging.INFO:
        return "warnings and errors print above"
    if files:
        return f"warnings and errors print above; the whole log is in {files[0]}"
    return "warnings and errors print above; INFO too: --log-file FILE or --status log"


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

    def __init__(self, running: LiveState, *, interval: float, mode: str = "auto",
                 console: Console | None = None) -> None:  # fmt: skip
        if mode == "auto":
            mode = "live" if sys.stdout.isatty() else "log"
        self.mode = mode
        self.running = running
        self.interval = interval
        self.console = console
        self._stopped = trio.Event()

    def stop(self) -> None:
        self._stopped.set()

    def document(self) -> dict[str, Any]:
        return status_document(self.running, now_wall=time.time(), now_monotonic=trio.current_time())

    @contextmanager
    def quiet_console(self) -> Iterator[None]:
        """In live mode, the console shows WARNING and above only from here on (the table is the
        view; the log's INFO is for --log-file) until the summary is printed."""
        if self.mode != "live":
            yield
            return
        with console_warnings_only():
            yield

    async def run(self) -> None:
        """Refresh until ``stop()``, then draw the last frame ("stopped"). Cancellation: the live
        table is left as last drawn."""
        if self.mode == "off":
            await self._stopped.wait()
            return
        if self.mode == "live":
            console = self.console or Console()
            footer = footer_text()
            with Live(view(self.document(), console.width, footer=footer), console=console, refresh_per_second=2,
                      transient=False) as live:  # fmt: skip
                while not self._stopped.is_set():
                    with trio.move_on_after(0.5):
                        await self._stopped.wait()
                    document = self.document()
                    final = self._stopped.is_set()
                    live.update(view(document, console.width, footer=None if final else footer, final=final))
            return
        while not self._stopped.is_set():
            with trio.move_on_after(self.interval):
                await self._stopped.wait()
            for line in lines(self.document()):
                log.info("status %s", line)

    def print_summary(self) -> None:
        """After a stop: the summary, on the console under the last frame (live) or in the log."""
        if self.mode == "off":
            return
        text = summary(self.document(), self.running)
        if self.mode == "live":
            console = self.console or Console()
            console.print("\n".join(text), highlight=False, soft_wrap=True)
            return
        for line in text:
            log.info("summary %s", line.strip())
