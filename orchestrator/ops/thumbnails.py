"""The confidence monitor's decoder: ffmpeg as a subprocess, only while someone watches.

A :class:`Thumbnailer` is fed every stream header and fragment of what the page shows (``up``'s
fan-out, the ingest server's POSTs); what it keeps and decodes is decided by
:mod:`orchestrator.ops.monitor` (the lease, the shelf, the rules). While nobody watches,
:meth:`Thumbnailer.offer` returns after one comparison and nothing is kept.

Decodes run in batches: one ``ffmpeg`` process (argv list; its inputs, each tile's header and
fragment, and its outputs in a private temporary directory) decodes up to ``batch`` tiles, since
starting ffmpeg costs more than decoding one keyframe; at most ``concurrency`` processes at once
over the whole process, each within ``timeout`` seconds (then killed and reaped by trio). A batch
that fails is decoded again tile by tile, to find the one bad input; a decode that fails or
times out is logged (``monitor.decode.failed``), counted, and the tile keeps its last picture.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from orchestrator.ops.monitor import (
    LEASE_SECONDS,
    Job,
    Key,
    Outputs,
    Picture,
    Shelf,
    TileJudge,
    ViewerLease,
    decode_argv,
    poll_seconds,
    rms_dbfs,
)

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 2
DEFAULT_BATCH = 16  # tiles decoded by one ffmpeg process
GATHER_SECONDS = 0.25  # after the first fragment wanted, wait this long for the others of the burst
DEFAULT_TIMEOUT = 10.0  # seconds for one process (a batch)
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
    """Tiles decoded, failed and timed out, since the start (``decodes`` in ``/monitor.json``);
    ``on_count(outcome, n)``, if set, hears each change too (``up``: a Prometheus counter)."""

    decoded: int = 0
    failed: int = 0
    timed_out: int = 0
    on_count: Callable[[str, int], None] | None = field(default=None, repr=False, compare=False)

    def add(self, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)
        if self.on_count is not None:
            self.on_count(outcome, n)

    def as_json(self) -> dict[str, int]:
        return {"decoded": self.decoded, "failed": self.failed, "timed_out": self.timed_out}


class Thumbnailer:
    """Keeps, decodes and judges the pictures of the tiles. See the module docstring."""

    def __init__(self, ffmpeg: str | None, *, fragment_seconds: float, concurrency: int = DEFAULT_CONCURRENCY,
                 batch: int = DEFAULT_BATCH, timeout: float = DEFAULT_TIMEOUT, lease: ViewerLease | None = None,
                 shelf: Shelf | None = None) -> None:  # fmt: skip
        self.ffmpeg = ffmpeg
        self.fragment_seconds = fragment_seconds
        self.timeout = timeout
        self.lease = lease or ViewerLease(max(LEASE_SECONDS, 3 * poll_seconds(fragment_seconds)))
        self.shelf = shelf or Shelf()
        self.concurrency = concurrency
        self.batch = batch
        self._running = 0  # ffmpeg processes running
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
        """Decode what the shelf says, while watched, until cancelled: at most ``concurrency``
        ffmpeg processes, each decoding a batch of up to ``batch`` tiles (gathered for
        :data:`GATHER_SECONDS` after the first is ready). Work is taken from the shelf only when
        a process can start, so nothing queues up behind a closed page.

        Cancellation: decodes in flight are cancelled (their ffmpeg killed and reaped, their
        temporary files removed)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                with trio.move_on_after(1.0):
                    await self._wake.wait()
                self._wake = trio.Event()
                if self.lease.lapsed(trio.current_time()):
                    self._watching = False
                    self.shelf.clear()
                    self.pictures.clear()
                    log.info("monitor.idle decoded=%d failed=%d timed_out=%d refused=%d", self.counts.decoded,
                             self.counts.failed, self.counts.timed_out, self.shelf.refused)  # fmt: skip
                if not self._watching or self.ffmpeg is None or self._running >= self.concurrency:
                    continue
                # The streams' fragments arrive in a burst at each boundary: gather it into full batches.
                await trio.sleep(GATHER_SECONDS)
                while self._running < self.concurrency and (jobs := self.shelf.jobs(self.batch)):
                    self._running += 1
                    nursery.start_soon(self._decode, jobs)

    async def _decode(self, jobs: list[Job]) -> None:
        try:
            pictures, outcome = await self._run_ffmpeg(jobs)
            if outcome == "failed" and len(jobs) > 1:  # one bad input fails the batch: find which, one by one
                pictures = [picture for job in jobs for picture in ((await self._run_ffmpeg([job]))[0] or [None])]
        finally:
            self._running -= 1
            for job in jobs:
                self.shelf.done(job)
            self._wake.set()
        if pictures is None or not self._watching:
            return
        for job, picture in zip(jobs, pictures, strict=True):
            if picture is None:
                continue
            self.counts.add("decoded", 1)
            entry = self.pictures.get(job.key)
            judge = entry[1] if entry else TileJudge()
            self.pictures[job.key] = (judge.add(picture), judge)

    async def _run_ffmpeg(self, jobs: list[Job]) -> tuple[list[Picture | None] | None, str]:
        """The ffmpeg processes for ``jobs`` (video, then audio): a picture (or None) per job and
        "ok", or None and "failed" / "timeout"."""
        assert self.ffmpeg is not None
        where = f"keys={','.join('/'.join((*job.key[0], job.key[1])) for job in jobs)} index={jobs[0].index}"
        with tempfile.TemporaryDirectory(prefix="orchestrator-monitor-") as tmp:
            batch = []
            for i, job in enumerate(jobs):
                out = Outputs(f"{tmp}/v{i}.mp4", f"{tmp}/a{i}.mp4", f"{tmp}/t{i}.png", f"{tmp}/g{i}.gray",
                              f"{tmp}/a{i}.pcm")  # fmt: skip
                if job.video is not None:
                    _write(Path(out.video_source), job.video_data)
                if job.audio is not None:
                    _write(Path(out.audio_source), job.audio_data)
                batch.append((job, out))
            for kind in ("video", "audio"):
                argv = decode_argv(self.ffmpeg, batch, kind)
                outcome = "ok" if argv is None else await self._run(argv, len(jobs), where)
                if outcome != "ok":
                    return None, outcome
            pictures: list[Picture | None] = []
            for job, out in batch:
                png = _read(Path(out.thumbnail)) if job.video is not None else None
                grid = _read(Path(out.grid)) if job.video is not None else None
                pcm = _read(Path(out.pcm)) if job.audio is not None else None
                if job.video is not None and not (png and grid):
                    self.counts.add("failed", 1)
                    log.warning("monitor.decode.failed key=%s index=%d reason=no_picture", job.key, job.index)
                    pictures.append(None)
                    continue
                pictures.append(Picture(job.index, png, grid, rms_dbfs(pcm) if pcm is not None else None))
        return pictures, "ok"

    async def _run(self, argv: list[str], jobs: int, where: str) -> str:
        """Run one ffmpeg within the timeout: "ok", "timeout", or "failed" (logged; counted when it
        was one job: a batch that fails is decoded again job by job)."""
        result = None
        with trio.move_on_after(self.timeout) as waiting:
            try:
                result = await trio.run_process(argv, stdin=b"", capture_stdout=True, capture_stderr=True,
                                                check=False)  # fmt: skip
            except OSError as exc:
                self.counts.add("failed", jobs)
                log.error("monitor.decode.failed %s error=%s", where, exc)
                return "timeout"  # not the input's fault: no retry job by job
        if waiting.cancelled_caught or result is None:
            self.counts.add("timed_out", jobs)
            log.warning("monitor.decode.failed %s reason=timeout seconds=%g", where, self.timeout)
            return "timeout"
        if result.returncode != 0:
            lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
            if jobs == 1:
                self.counts.add("failed", 1)
            log.warning("monitor.decode.failed %s exit_code=%d stderr=%r", where, result.returncode,
                        lines[-1] if lines else "")  # fmt: skip
            return "failed"
        return "ok"


def _write(path: Path, data: bytes) -> None:
    # Synchronous, as the ingest server's archive writes: a fragment or two, to a local temporary
    # directory, once per fragment at most while a page is open.
    path.write_bytes(data)


def _read(path: Path) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_OUTPUT + 1)
    except OSError:
        return None
    return data if len(data) <= MAX_OUTPUT else None
