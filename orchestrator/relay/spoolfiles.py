"""The relay's durable spool on disk: the thin file shell around :mod:`orchestrator.relay.spool`.

Layout: ``<spool>/<stream id>/<number, 12 digits>.seg``, append-only segment files (the stream
id is a profile stream id, a safe file name). Each record is one ``os.write`` to a file opened
``O_APPEND``, before the fragment goes to any outbox.

**fsync policy** (the relay group's ``fsync`` key):

* ``"fragment"`` (the default): every record is fsync'd, and the stream's directory after a
  segment is created, before the fragment is forwarded. A fragment the relay forwarded is on
  stable storage: it survives a killed process and a crashed host. It costs one fsync per
  fragment and track (500 a second for 1,000 two-track streams of 2 s fragments).
* ``"none"``: no fsync. A write is in the kernel's page cache when it returns, which a killed
  process (SIGKILL, the OOM killer) does not lose; a crashed host or a power cut may.

Writes are synchronous, on the event loop: small, in order, never interrupted by cancellation
(the same choice as the ingest archive). An fsync is not: it waits for the disk, milliseconds to
tens of them, and 150 of them a second on the event loop starved 300 streams. So a write leaves
its fsyncs pending (:meth:`SpoolFiles.take_syncs`: duplicated descriptors, so a rotation that
closes the file meanwhile does not matter) and the caller runs them in a worker thread
(:func:`sync_all`) before it forwards the fragment; fsyncs of different streams overlap. A write
that fails (a full disk) raises OSError; the caller logs and counts it and still forwards the
fragment (held in memory only). A deleted segment's directory entry is not fsync'd: a deletion
lost in a crash brings back a segment whose fragments are sent again, and receivers drop them.

Recovery reads every segment of every stream, cuts a torn tail off the newest segment of a
stream, and deletes nothing until the endpoints' outboxes say they have the fragments.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.fmp4.stream import EncodedFragment
from orchestrator.relay.spool import (
    DEFAULT_SEGMENT_BYTES,
    Key,
    Record,
    StreamSpool,
    encode_fragment,
    encode_header,
    recover,
)

log = logging.getLogger(__name__)

SUFFIX = ".seg"


@dataclass
class _Open:
    number: int
    fd: int


class SpoolFiles:
    """The spool of every stream of one relay, under ``root``."""

    def __init__(self, root: Path, *, fsync: bool = True, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.root = root
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.streams: dict[str, StreamSpool] = {}
        self._open: dict[str, _Open] = {}
        self._syncs: dict[str, list[int]] = {}  # per stream, duplicated descriptors to fsync
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, stream_id: str) -> Path:
        return self.root / stream_id

    def _path(self, stream_id: str, number: int) -> Path:
        return self._dir(stream_id) / f"{number:012d}{SUFFIX}"

    def spool(self, stream_id: str) -> StreamSpool:
        spool = self.streams.get(stream_id)
        if spool is None:
            spool = self.streams[stream_id] = StreamSpool(self.segment_bytes)
        return spool

    # --- recovery --------------------------------------------------------------------------

    def recover(self, stream_id: str) -> list[Record]:
        """Everything spooled for ``stream_id`` by an earlier run, in recovery order. A torn
        record at the end of a segment is cut off (logged); the stream's spool is rebuilt."""
        directory = self._dir(stream_id)
        if not directory.is_dir():
            return []
        files = sorted(p for p in directory.iterdir() if p.suffix == SUFFIX and p.stem.isdigit())
        segments = [(int(p.stem), p.read_bytes()) for p in files]
        records, decoded = recover(segments, stream_id)
        spool = self.spool(stream_id)
        for number, result in decoded:
            spool.recovered(number, result.good_length, result.records)
            if result.problem is not None:
                log.warning("relay.spool.cut stream=%s segment=%d problem=%r kept_bytes=%d", stream_id, number,
                            result.problem, result.good_length)  # fmt: skip
                os.truncate(self._path(stream_id, number), result.good_length)
        if records:
            log.info("relay.spool.recovered stream=%s segments=%d fragments=%d bytes=%d", stream_id, len(decoded),
                     spool.fragments, spool.bytes)  # fmt: skip
        return records

    # --- writing ---------------------------------------------------------------------------

    def append_header(self, stream_id: str, data: bytes) -> None:
        spool = self.spool(stream_id)
        if spool.header == data:
            return
        record = encode_header(data)
        self._write(stream_id, spool, record)
        spool.wrote_header(len(record), data)
        self._sync_later(stream_id)

    def append_fragment(self, stream_id: str, fragment: EncodedFragment) -> int:
        """Spool ``fragment`` (written when this returns; on stable storage once the fsyncs of
        :meth:`take_syncs` have run); its sequence number."""
        spool = self.spool(stream_id)
        record = encode_fragment(fragment)
        self._write(stream_id, spool, record)
        seq = spool.wrote_fragment(len(record), fragment)
        self._sync_later(stream_id)
        return seq

    def take_syncs(self, stream_id: str) -> list[int]:
        """The descriptors to fsync (and close) before what was written for ``stream_id`` counts as
        on stable storage: run :func:`sync_all` on them (in a worker thread). Empty with fsync off."""
        return self._syncs.pop(stream_id, [])

    def sync(self, stream_id: str) -> None:
        """Run the stream's pending fsyncs here and now (blocking)."""
        sync_all(self.take_syncs(stream_id))

    def _write(self, stream_id: str, spool: StreamSpool, record: bytes) -> None:
        placement = spool.place(len(record))
        current = self._open.get(stream_id)
        if placement.new or current is None or current.number != placement.number:
            if current is not None:
                os.close(current.fd)
                del self._open[stream_id]
            self._dir(stream_id).mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self._path(stream_id, placement.number), flags, 0o600)
            self._open[stream_id] = current = _Open(placement.number, fd)
            if placement.new:
                spool.opened(placement.number)
                if placement.header_first and spool.header is not None:
                    header = encode_header(spool.header)
                    _write_all(fd, header)
                    spool.wrote_header(len(header), spool.header)
                if self.fsync:  # the new file's directory entry
                    directory = os.open(self._dir(stream_id), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                    self._syncs.setdefault(stream_id, []).append(directory)
        _write_all(current.fd, record)

    def _sync_later(self, stream_id: str) -> None:
        if self.fsync:
            self._syncs.setdefault(stream_id, []).append(os.dup(self._open[stream_id].fd))

    # --- releasing -------------------------------------------------------------------------

    def release(self, stream_id: str, oldest_held: list[Key | None]) -> int:
        """Delete the segments no endpoint needs any more; returns how many were deleted."""
        spool = self.streams.get(stream_id)
        if spool is None:
            return 0
        gone = spool.release(spool.low_water(oldest_held))
        for number in gone:
            with contextlib.suppress(FileNotFoundError):
                self._path(stream_id, number).unlink()
        return len(gone)

    def close(self) -> None:
        """Run what fsyncs are pending, close every file."""
        for stream_id in list(self._syncs):
            self.sync(stream_id)
        for current in self._open.values():
            os.close(current.fd)
        self._open.clear()


def sync_all(fds: list[int]) -> None:
    """fsync then close each descriptor (blocking: run it in a worker thread). Raises the first
    OSError after closing them all."""
    error: OSError | None = None
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            error = error or exc
        finally:
            os.close(fd)
    if error is not None:
        raise error


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
