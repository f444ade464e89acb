"""The operator's view while ``up`` runs: one line per stream.

On a terminal it is a live table (rich) redrawn twice a second; otherwise (a pod's log, a pipe)
it is one plain log line per stream every fragment duration, so ``kubectl logs`` tells the same
story. Each line: the stream, the last fragment index encoded, and per group the endpoints
currently streaming over those configured, with the age of the last fragment pushed.
"""

from __future__ import annotations

import logging
import sys

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.ops.state import LiveState
from orchestrator.profile import Profile

log = logging.getLogger(__name__)


class StatusView:
    def __init__(self, running: LiveState, profile: Profile, *, mode: str = "auto") -> None:
        if mode == "auto":
            mode = "live" if sys.stdout.isatty() else "log"
        self.mode = mode
        self.running = running
        self.profile = profile
        self.interval = float(profile.presentation.fragment_duration)
        self._stopped = trio.Event()

    def stop(self) -> None:
        self._stopped.set()

    def rows(self) -> list[tuple[str, str, list[tuple[str, int, int, float | None]]]]:
        """Per stream: (stream id, last index, [(group, connected, total, last push age)])."""
        now = trio.current_time()
        rows = []
        for stream in self.profile.streams:
            indices = [e.last_index for e in self.running.encoders if e.stream_id == stream.id]
            known = [i for i in indices if i is not None]
            index = str(max(known)) if known else "-"
            groups = []
            for group in dict.fromkeys(p.group for p in self.running.publishers):
                states = [p for p in self.running.publishers if p.group == group and p.stream_id == stream.id]
                pushes = [p.last_push_monotonic for p in states if p.last_push_monotonic is not None]
                age = now - max(pushes) if pushes else None
                groups.append((group, sum(p.connected for p in states), len(states), age))
            rows.append((stream.id, index, groups))
        return rows

    def line(self, stream_id: str, index: str, groups: list[tuple[str, int, int, float | None]]) -> str:
        parts = [f"stream={stream_id}", f"index={index}"]
        for group, connected, total, age in groups:
            age_text = f"{age:.1f}s" if age is not None else "never"
            parts.append(f"{group}={connected}/{total} last_push={age_text}")
        return " ".join(parts)

    def table(self) -> Table:
        table = Table(title=f"orchestrator: {self.profile.presentation.name}", expand=False)
        table.add_column("stream")
        table.add_column("fragment index", justify="right")
        groups = list(dict.fromkeys(p.group for p in self.running.publishers))
        for group in groups:
            table.add_column(f"{group}: up / last push")
        for stream_id, index, group_rows in self.rows():
            cells = [stream_id, index]
            for _, connected, total, age in group_rows:
                colour = "green" if connected == total else ("yellow" if connected else "red")
                age_text = f"{age:.1f}s" if age is not None else "never"
                cells.append(f"[{colour}]{connected}/{total}[/] {age_text}")
            table.add_row(*cells)
        return table

    async def run(self) -> None:
        """Refresh until ``stop()``. Cancellation: the live table is left as last drawn."""
        if self.mode == "off":
            await self._stopped.wait()
            return
        if self.mode == "live":
            with Live(self.table(), console=Console(), refresh_per_second=2, transient=False) as live:
                while not self._stopped.is_set():
                    with trio.move_on_after(0.5):
                        await self._stopped.wait()
                    live.update(self.table())
            return
        while not self._stopped.is_set():
            with trio.move_on_after(self.interval):
                await self._stopped.wait()
            for row in self.rows():
                log.info("status %s", self.line(*row))
