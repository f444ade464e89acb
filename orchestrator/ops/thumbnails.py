"""The confidence monitor's decoder: ffmpeg as a subprocess, only while someone watches.

A :class:`Thumbnailer` is fed every stream header and fragment of what the page shows (``up``'s
fan-out, the ingest server's POSTs); what it keeps and decodes is decided by
:mod:`orchestrator.ops.monitor` (the lease, the shelf, the rules). While nobody watches,
:meth:`Thumbnailer.offer` returns after one comparison and nothing is kept.

Each decode is one ``ffmpeg`` process (argv list, stdin the header and fragment bytes, its
outputs in a private temporary directory), at most ``concurrency`` at once over the whole
process, each within ``timeout`` seconds (then killed and reaped by trio). A decode that fails or
times out is logged (``monitor.decode.failed``), counted, and the tile keeps its last picture.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from orchestrator.ops.monitor import (
    Job,
    Key,
    Picture,
    Shelf,
    TileJudge,
    ViewerLease,
    decode_argv,
    rms_dbfs,
)

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 2
DEFAULT_TIMEOUT = 5.0
MAX_OUTPUT = 1024 * 1024  # bytes of a PNG we accept back from ffmpeg


def find_ffmpeg() -> str | None:
    """ffmpeg on PATH, else the imageio-ffmpeg wheel's, else None (the pages then show no pictures)."""
    found = shutil.which("ffmpeg")
    if found is not None:
        return found
    try:
        import imageio_ffmpeg  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return str(imageio_ffmpeg.get_ffmpeg_exe())


@dataclass
class DecodeCounts:
    decoded: int = 0
    failed: int = 0
    timed_out: int = 0


class Thumbnailer:
    """Keeps, decodes and judges the pictures of the tiles. See the module docstring."""

    def __init__(self, ffmpeg: str | None, *, fragment_seconds: float, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = DEFAULT_TIMEOUT, lease: ViewerLease | None = None,
                 shelf: Shelf | None = None) -> None:  # fmt: skip
        self.ffmpeg = ffmpeg
        self.fragment_seconds = fragment_seconds
        self.timeout = timeout
        self.lease = lease or ViewerLease()
        self.shelf = shelf or Shelf()
        self.slots = trio.CapacityLimiter(concurrency)
        self.pictures: dict[Key, tuple[Picture, TileJudge]] = {}
        self.counts = DecodeCounts()
        self._wake = trio.Event()
        self._watching = False  # the lease's state as of the last check: offer() reads only this

    # --- what the page's handler calls ----------------------------------------------------------

    def watch(self) -> None:
        """A page polled: keep (or start) decoding."""
        self.lease.renew(trio.current_time())
        if not self._watching:
            self._watching = True
            log.info("monitor.watching ffmpeg=%s", self.ffmpeg or "none")
        self._wake.set()

    @property
    def watching(self) -> bool:
        return self._watching

    # --- what the producers call (never waits) ---------------------------------------------------

    def header(self, key: Key, data: bytes, kinds: Iterable[str]) -> None:
        self.shelf.header(key, data, kinds)

    def offer(self, key: Key, index: int, kind: str, data: bytes) -> None:
        if not self._watching:
            return
        self.shelf.offer(key, index, kind, data)
        self._wake.set()

    # --- the decoding task -------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Decode what the shelf says, while watched, until cancelled.

        Cancellation: decodes in flight are cancelled (their ffmpeg killed and reaped, their
        temporary files removed)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                with trio.move_on_after(1.0):
                    await self._wake.wait()
                self._wake = trio.Event()
                now = trio.current_time()
                if self.lease.lapsed(now):
                    self._watching = False
                    self.shelf.clear()
                    self.pictures.clear()
                    log.info("monitor.idle decoded=%d failed=%d timed_out=%d refused=%d", self.counts.decoded,
                             self.counts.failed, self.counts.timed_out, self.shelf.refused)  # fmt: skip
                if not self._watching or self.ffmpeg is None:
                    continue
                for job in self.shelf.jobs():
                    nursery.start_soon(self._decode, job)

    async def _decode(self, job: Job) -> None:
        try:
            async with self.slots:
                picture = await self._run_ffmpeg(job)
        finally:
            self.shelf.done(job)
            self._wake.set()
        if picture is None or not self._watching:
            return
        self.counts.decoded += 1
        entry = self.pictures.get(job.key)
        judge = entry[1] if entry else TileJudge()
        judge.add(picture)
        self.pictures[job.key] = (judge.last or picture, judge)

    async def _run_ffmpeg(self, job: Job) -> Picture | None:
        assert self.ffmpeg is not None
        with tempfile.TemporaryDirectory(prefix="orchestrator-monitor-") as tmp:
            out = Path(tmp)
            argv = decode_argv(self.ffmpeg, job, str(out / "t.png"), str(out / "g.gray"), str(out / "a.pcm"))
            result = None
            with trio.move_on_after(self.timeout) as waiting:
                try:
                    result = await trio.run_process(argv, stdin=job.data, capture_stdout=True, capture_stderr=True,
                                                    check=False)  # fmt: skip
                except OSError as exc:
                    self.counts.failed += 1
                    log.error("monitor.decode.failed key=%s index=%d error=%s", job.key, job.index, exc)
                    return None
            if waiting.cancelled_caught or result is None:
                self.counts.timed_out += 1
                log.warning("monitor.decode.failed key=%s index=%d reason=timeout seconds=%g", job.key, job.index,
                            self.timeout)  # fmt: skip
                return None
            if result.returncode != 0:
                self.counts.failed += 1
                lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
                log.warning("monitor.decode.failed key=%s index=%d exit_code=%d stderr=%r", job.key, job.index,
                            result.returncode, lines[-1] if lines else "")  # fmt: skip
                return None
            png = _read(out / "t.png") if job.video is not None else None
            grid = _read(out / "g.gray") if job.video is not None else None
            pcm = _read(out / "a.pcm") if job.audio is not None else None
        if job.video is not None and not (png and grid):
            self.counts.failed += 1
            log.warning("monitor.decode.failed key=%s index=%d reason=no_picture", job.key, job.index)
            return None
        return Picture(job.index, png, grid, rms_dbfs(pcm) if pcm is not None else None)


def _read(path: Path) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_OUTPUT + 1)
    except OSError:
        return None
    return data if len(data) <= MAX_OUTPUT else None
